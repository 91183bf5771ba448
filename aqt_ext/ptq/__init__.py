"""Post-training quantization: PWLQ, REx and AQuant (methods.md 5-7).

`pwlq`, `rex` and `aquant` hold each method's math as small pure functions;
`bn_fold` folds BatchNorm into the preceding conv; `pipeline` runs PTQ of a
trained float checkpoint end to end (`pipeline.run_ptq`, CLI
``python -m aqt_ext.ptq``). The pipeline is not imported here, so the math
modules stay light.
"""
