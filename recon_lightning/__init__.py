"""recon_lightning: audit transfer-learning classifiers by reconstructing their training data.

Data flow, one module per stage (each reads the previous stage's outputs from ``run_dir``):

    data/backbones -> embed -> victim -> reconstruct -> select -> invert -> evaluate/report
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from recon_lightning import audit`` (and the stage functions it composes), imported on first use: importing
    the package alone stays light."""
    import importlib

    if name in ("audit", "load_config", "run_pipeline"):
        api = importlib.import_module(".api", __name__)
        return getattr(api, name)
    raise AttributeError(f"module 'recon_lightning' has no attribute {name!r}")


# (the importer is recon_lightning.import_victim.import_victim: the module's name is taken by the module)
__all__ = ["audit", "load_config", "run_pipeline", "__version__"]
