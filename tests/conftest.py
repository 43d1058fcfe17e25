import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import assets  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny local world (see tests/assets.py), built once per test session."""
    root = str(tmp_path_factory.mktemp("tiny"))
    assets.build(root)
    return {name: os.path.join(root, name) for name in os.listdir(root)}


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["policy"])


@pytest.fixture(scope="session")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
