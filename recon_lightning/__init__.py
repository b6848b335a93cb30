"""recon_lightning: audit transfer-learning classifiers by reconstructing their training data.

Data flow, one module per stage (each reads the previous stage's outputs from ``run_dir``):

    data/backbones -> embed -> victim -> reconstruct -> select -> invert -> evaluate/report
"""

__version__ = "0.1.0"
