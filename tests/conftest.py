import atexit
import os
import shutil
import tempfile

# =====================================================================================================
# Local Hugging Face Hub server (tests/support/hub_server.py)
#
# This section MUST stay at the very top of the file, before any import that (transitively) imports
# huggingface_hub / diffusers / transformers: huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME...
# at import time. So the port is picked here, and the server is started on it by the `hub_server` fixture.
# =====================================================================================================
from tests.support.hub_server import LocalHubServer, free_port  # noqa: E402

HUB_PORT = free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="diffusers_uce_hf_home_")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

# Never touch the user's cache or token, never reach the real Hub.
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
             "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_MODULES_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE",
             "HUGGINGFACE_CO_STAGING", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.pop(_var, None)
os.environ.update(
    HF_ENDPOINT=HUB_ENDPOINT,
    HF_HUB_DISABLE_XET="1",  # upload/download through the plain LFS + resolve endpoints of hub_server
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="0",
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """A running LocalHubServer at HF_ENDPOINT (shared by the session: use unique repo names per test)."""
    import huggingface_hub.constants

    if huggingface_hub.constants.ENDPOINT != HUB_ENDPOINT:
        pytest.fail(
            f"huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT (it points to "
            f"{huggingface_hub.constants.ENDPOINT}, not {HUB_ENDPOINT}); refusing to talk to a real Hub."
        )
    server = LocalHubServer(str(tmp_path_factory.mktemp("hub_root")), port=HUB_PORT).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def hub_token() -> str:
    """Any token is accepted by the local hub server."""
    return "hf_local_test_token"


# =====================================================================================================
# (end of the local Hub server section; other fixtures go below)
# =====================================================================================================


# =====================================================================================================
# Tiny pipelines: the shared fixtures every family-parametrised test uses
# =====================================================================================================
import torch  # noqa: E402

# The tiny models' ops are far too small to gain from threads; on a shared 2-core machine intra-op threading
# made the suite several times slower. One thread keeps it fast and its timings steady.
torch.set_num_threads(1)


FAMILIES = ["sd1", "sd2", "sdxl", "flux"]


@pytest.fixture(params=FAMILIES)
def family(request):
    """Every test taking `family` (or `pipe`) runs on each pipeline family."""
    return request.param


@pytest.fixture
def pipe(family):
    """A fresh tiny pipeline of `family` with the plugin attached."""
    import diffusers_uce
    from diffusers_uce.demo import make_demo_pipeline

    return diffusers_uce.attach(make_demo_pipeline(family))
