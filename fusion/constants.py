"""Names shared by the library, the command line and cl_driver: one constant, one home."""

RESCALER_MODES = ("model", "tensor-mean", "tensor")  # the paper's, the official code's, one per tensor
MISSING_MODES = ("error", "zero")  # a base tensor a checkpoint lacks: refuse, or count it unchanged
KERNELS = ("reference", "cpu", "triton")
DEVICES = ("auto", "cpu", "cuda")
