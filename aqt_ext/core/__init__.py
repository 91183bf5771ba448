"""The numerics of aqt_ext, free of any framework: it imports jax and numpy
only (a test checks). Quantizers and grids (`quantizers`), the methods and
their registry (`methods`, one file per method), DQ's levels and clip search
(`levels`, `clip_search`), the one integer contraction (`int_ops`), and the
`QuantContext` through which the linen and NNX layers give the methods their
state (`context`)."""
