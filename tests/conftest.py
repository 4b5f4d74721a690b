import os

# Tests never reach the network: weights and data are generated locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pretraining_run(tmp_path_factory):
    """The output folder of one tiny pre-training run (ResNet-18 U-Net, 64 px views of 96 px
    phantoms, 2 CAiD steps), shared by the tests that start from a pre-trained backbone."""
    from caid_hf.training.pretrain import main

    from helpers import tiny_pretraining_args

    out = tmp_path_factory.mktemp("tiny_pretraining")
    main([*tiny_pretraining_args(queue_size=32, num_train_phantoms=16, max_steps=2),
          "--output_dir", str(out)])
    return out


@pytest.fixture
def free_port() -> int:
    """A local TCP port free right now, for the rendezvous of a two-process launch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_config():
    from caid_hf import CAiDConfig

    return CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16)
