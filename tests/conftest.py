import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# figures/tables written by tests go under runs/, never over the committed outputs of the tiny run
os.environ.setdefault("SAFEMED_OUTPUT_DIR", "runs/test-outputs")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _image_cache(tmp_path_factory):
    """Resized-image cache entries of a test session go to a temporary folder, not data/cache."""
    os.environ.setdefault("SAFEMED_IMAGE_CACHE", str(tmp_path_factory.mktemp("image-cache")))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def items(request, tmp_path_factory):
    """A 16-image embedded benchmark at the test module's ``SIZE`` (test_sft, test_binding)."""
    from safemed_lib import data, synth

    root = synth.ensure_benchmark(tmp_path_factory.mktemp("bench"), n_images=16, seed=0, size=request.module.SIZE)
    return data.load_omnimedvqa(root)


@pytest.fixture(scope="module")
def base_dir(request, items, tmp_path_factory):
    """One saved tiny base (``base.build`` with the module's ``TINY`` fields of ``config.TinyBase``, its
    default pretraining steps); every test loads its own copy."""
    from safemed_lib import base, config

    out_dir = tmp_path_factory.mktemp("base")
    base.build(items, config.TinyBase(**request.module.TINY), image_size=request.module.SIZE, seed=0, out_dir=out_dir)
    return out_dir / "model"
