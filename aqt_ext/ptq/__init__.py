"""Post-training quantization methods: PWLQ, REx and AQuant (methods.md 5-7).

Each module holds the math of one method as small pure functions.
"""
