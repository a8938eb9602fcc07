"""The one "folder or Hub repo" file resolver and the Hub reachability checks (no network: local caches, a local
HTTP server and refused ports stand in for the Hub)."""

import http.server
import socket
import threading

import pytest
from huggingface_hub import constants

from digseg_diffusers.hub import files as hub_files
from digseg_diffusers.hub.files import (
    hub_kwargs,
    hub_reachable,
    is_hub_unreachable,
    require_hub_source,
    resolve_file,
)
from digseg_diffusers.testing_utils import write_hub_cache


@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "repo"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "config.json").write_text("{}")
    (folder / "weights.safetensors").write_bytes(b"x")
    return folder


def test_resolve_file_in_a_folder(repo):
    assert resolve_file(repo, "config.json", "sub") == str(repo / "sub" / "config.json")
    assert resolve_file(repo, "weights.safetensors") == str(repo / "weights.safetensors")
    assert resolve_file(repo, "absent.json", "sub") is None
    assert resolve_file(repo, "config.json") is None  # not in the root


@pytest.mark.parametrize("offline_mode", [False, True], ids=["local_files_only", "HF_HUB_OFFLINE"])
def test_resolve_file_through_the_hub_cache(repo, tmp_path, monkeypatch, offline_mode):
    cache = tmp_path / "cache"
    snapshot = write_hub_cache(cache, "someone/repo", repo)
    if offline_mode:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        lookup = {"cache_dir": cache}
    else:
        lookup = {"cache_dir": cache, "local_files_only": True}
    with open(resolve_file("someone/repo", "config.json", "sub", **lookup)) as handle:
        assert handle.read() == "{}"
    assert resolve_file("someone/repo", "config.json", "sub", **lookup).startswith(snapshot)
    # the cache answers for this repo: a file it lacks is a file the repo lacks
    assert resolve_file("someone/repo", "absent.json", **lookup) is None
    with pytest.raises(OSError, match="the class proposer 'someone/other'.*not in the Hugging Face cache"):
        resolve_file("someone/other", "config.json", what="the class proposer", **lookup)
    with pytest.raises(OSError, match="neither a local folder nor a valid Hugging Face Hub repo id"):
        resolve_file(str(tmp_path / "no" / "such" / "folder"), "config.json", **lookup)


def test_hub_kwargs_keeps_only_lookup_arguments():
    kwargs = {"cache_dir": "/c", "revision": "v1", "dtype": "float16", "token": "t", "use_safetensors": True}
    assert hub_kwargs(kwargs) == {"cache_dir": "/c", "revision": "v1", "token": "t"}


def _chain(error: BaseException, *causes: BaseException, context: bool = False) -> BaseException:
    """``error`` raised from ``causes[0]``, raised from ``causes[1]``... (or during their handling)."""
    current = error
    for cause in causes:
        if context:
            current.__context__ = cause
        else:
            current.__cause__ = cause
        current = cause
    return error


def test_is_hub_unreachable_reads_the_typed_error_chain(tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    with pytest.raises(LocalEntryNotFoundError) as real:  # what an uncached file gives without network
        hf_hub_download("someone/absent", "config.json", cache_dir=tmp_path, local_files_only=True)
    assert is_hub_unreachable(real.value)
    # how transformers and diffusers wrap it (seen on a machine without a route to the Hub)
    assert is_hub_unreachable(_chain(OSError("Cannot load model"), OfflineModeIsEnabled("offline mode")))
    assert is_hub_unreachable(
        _chain(OSError("not fully cached"), ConnectionError("ConnectError"), socket.gaierror(-2, "Name or service"),
               context=True)
    )  # fmt: skip
    assert is_hub_unreachable(TimeoutError("timed out"))
    # words alone mean nothing: a broken file is not a network problem, whatever its message says
    assert not is_hub_unreachable(OSError("We couldn't connect to 'https://huggingface.co' (offline?)"))
    assert not is_hub_unreachable(_chain(OSError("bad model_index.json"), ValueError("network unreachable")))
    assert not is_hub_unreachable(None)
    looped = OSError("loop")
    looped.__context__ = ValueError("inner")
    looped.__context__.__context__ = looped
    assert not is_hub_unreachable(looped)


class _AnswerEverything404(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_HEAD(self):  # noqa: N802 - http.server's name
        type(self).requests += 1
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def answering_endpoint():
    """A local HTTP server that answers every request with 404 (a Hub that can be asked); yields its URL."""
    _AnswerEverything404.requests = 0
    server = http.server.HTTPServer(("127.0.0.1", 0), _AnswerEverything404)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_hub_reachable_asks_the_configured_endpoint(monkeypatch, answering_endpoint):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub_reachable(timeout=2.0) is False

    monkeypatch.setattr(constants, "ENDPOINT", answering_endpoint)
    assert hub_reachable(timeout=2.0) is True  # any HTTP answer, even 404, means the Hub can be asked
    assert _AnswerEverything404.requests == 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable(timeout=2.0) is False  # offline mode: not even asked
    assert _AnswerEverything404.requests == 1


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _never_ask_the_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(hub_files, "hub_reachable", fail)


def test_require_hub_source_accepts_folders_and_cached_repos_without_asking(repo, tmp_path, monkeypatch, empty_hub_cache):
    _never_ask_the_hub(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert require_hub_source(repo, "the base model") is None
    assert require_hub_source(str(repo), "the base model", local_files_only=True) is None
    write_hub_cache(tmp_path / "cache", "someone/cached", repo)
    assert require_hub_source("someone/cached", "the base model", cache_dir=tmp_path / "cache") is None
    write_hub_cache(empty_hub_cache, "someone/in-default-cache", repo)
    assert require_hub_source("someone/in-default-cache", "the base model") is None  # the configured cache


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message.strip()
    return message


def test_require_hub_source_offline_fails_at_once_with_the_way_out(monkeypatch, empty_hub_cache):
    _never_ask_the_hub(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as error:
        require_hub_source("someone/uncached", "the base model")
    message = _one_line(error)
    assert "the base model 'someone/uncached'" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match="'someone/uncached'.*local_files_only") as error:
        require_hub_source("someone/uncached", "the text encoder", local_files_only=True)
    _one_line(error)


@pytest.mark.parametrize("path", ["/no/such/folder", "./missing", "a/b/c", "not a repo id!"])
def test_require_hub_source_names_a_missing_folder_without_asking(monkeypatch, empty_hub_cache, path):
    _never_ask_the_hub(monkeypatch)
    with pytest.raises(OSError, match="no such folder") as error:
        require_hub_source(path, "the adapter")
    assert repr(path) in _one_line(error)


def test_require_hub_source_asks_the_configured_endpoint_once(monkeypatch, empty_hub_cache, answering_endpoint):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(OSError) as error:
        require_hub_source("someone/uncached", "the base model")
    message = _one_line(error)
    assert "'someone/uncached'" in message and constants.ENDPOINT in message
    assert "HF_HUB_OFFLINE=1" in message and "local folder" in message
    monkeypatch.setattr(constants, "ENDPOINT", answering_endpoint)
    assert require_hub_source("someone/uncached", "the base model") is None  # the Hub answers: the loader goes on
    assert _AnswerEverything404.requests == 1


@pytest.mark.slow
def test_the_pipelines_saved_proposer_comes_back_from_the_hub_cache(tmp_path, monkeypatch):
    """`DiGSegPipeline.from_pretrained` of a Hub id finds ``class_proposer/`` through the same resolver (and cache)."""
    from digseg_diffusers import DiGSegPipeline
    from digseg_diffusers.proposal import DiGSegClassProposer
    from digseg_diffusers.testing_utils import make_tiny_class_proposer, make_tiny_pipeline

    pipe = make_tiny_pipeline()
    pipe.set_class_proposer(make_tiny_class_proposer(global_threshold=-1.0, top_k=2))
    pipe.save_pretrained(tmp_path / "pipe")
    write_hub_cache(tmp_path / "cache", "someone/digseg-with-proposer", tmp_path / "pipe", with_tree=True)
    make_tiny_pipeline().save_pretrained(tmp_path / "bare")
    write_hub_cache(tmp_path / "cache", "someone/digseg-bare", tmp_path / "bare", with_tree=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    loaded = DiGSegPipeline.from_pretrained("someone/digseg-with-proposer", cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.class_proposer, DiGSegClassProposer)
    assert loaded.class_proposer.proposer_config() == pipe.class_proposer.proposer_config()
    bare = DiGSegPipeline.from_pretrained("someone/digseg-bare", cache_dir=str(tmp_path / "cache"))
    assert bare.class_proposer is None


@pytest.mark.parametrize("offline_mode", [True, False], ids=["HF_HUB_OFFLINE", "hub-not-answering"])
def test_loaders_refuse_an_uncached_hub_id_in_one_line(tmp_path, monkeypatch, empty_hub_cache, offline_mode):
    """`from_base_model` and `from_pretrained` check their Hub ids before diffusers / transformers retry them."""
    from digseg_diffusers import DiGSegPipeline
    from digseg_diffusers.testing_utils import save_tiny_sd_base

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_mode)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    way_out = "HF_HUB_OFFLINE is set" if offline_mode else "does not answer"
    with pytest.raises(OSError, match=f"the base model 'someone/uncached-sd2'.*{way_out}") as error:
        DiGSegPipeline.from_base_model("someone/uncached-sd2", text_encoder="someone/uncached-clip")
    _one_line(error)
    base = save_tiny_sd_base(tmp_path / "base")  # a local base: the text encoder is the one that cannot be had
    with pytest.raises(OSError, match=f"the text encoder 'someone/uncached-clip'.*{way_out}") as error:
        DiGSegPipeline.from_base_model(base, text_encoder="someone/uncached-clip")
    _one_line(error)
    with pytest.raises(OSError, match=f"the DiGSeg pipeline 'someone/uncached-digseg'.*{way_out}") as error:
        DiGSegPipeline.from_pretrained("someone/uncached-digseg")
    _one_line(error)
    with pytest.raises(OSError, match="'missing/model/folder': no such folder") as error:
        DiGSegPipeline.from_pretrained("missing/model/folder")
    _one_line(error)


def test_tests_see_no_hub_environment_of_the_caller():
    """tests/conftest.py's autouse fixture: without it, ``HF_HUB_OFFLINE=1`` in the shell made the endpoint test fail
    (and a token or another endpoint would reach every test and subprocess)."""
    import os

    import diffusers.loaders.lora_base  # copies HF_HUB_OFFLINE at import

    assert not [name for name in os.environ if name.startswith(("HF_", "HUGGINGFACE_")) or name == "TRANSFORMERS_OFFLINE"]
    assert constants.HF_HUB_OFFLINE is False and diffusers.loaders.lora_base.HF_HUB_OFFLINE is False
    assert constants.ENDPOINT == "https://huggingface.co"
