"""gait_ref: reference NumPy/CuPy implementation of GAIT-prop and the learning rules it
is compared with (BP, FA, DFA, TP, ITP), with exact inverses and explicit gradients."""
__version__ = "0.1.0"
