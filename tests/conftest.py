import os

import pytest
import torch

# Tests never touch the network: W&B offline, Hugging Face hub offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real Hydra config with overrides, pointing run_dir at a temp folder."""
    from recon_lightning.fit import load_config

    def make(*overrides, run_dir=None):
        return load_config([f"run_dir={run_dir or tmp_path / 'run'}", "logger.name=csv",
                            "trainer.enable_progress_bar=false", *overrides])

    return make
