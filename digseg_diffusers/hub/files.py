"""One resolver for "this file of a local folder or of a Hugging Face Hub repo", and what a Hub failure means.

Files go through `hf_hub_download` (its cache, offline mode and token), with one policy: a file the repo lacks is
``None`` (the caller knows whether it was optional); a repo that cannot be had at all is an `OSError` naming the
source and what to do. Loaders that hand a Hub id to diffusers / transformers call `require_hub_source` first: it
settles in seconds what huggingface_hub would retry for about 30 s before raising a long chain.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
"""The `from_pretrained` keyword arguments that concern finding files (passed on to every Hub look-up)."""


def hub_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub look-up arguments (`HUB_KWARGS`) among a `from_pretrained` call's keyword arguments."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def repo_cached(repo_id: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the Hub cache holds a snapshot of ``repo_id`` (then a file missing from it is missing from the repo)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = os.path.join(str(cache_dir or constants.HF_HUB_CACHE), repo_folder_name(repo_id=repo_id, repo_type="model"))
    return os.path.isdir(os.path.join(folder, "snapshots"))


def resolve_file(
    folder_or_repo_id: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    revision: str | None = None,
    *,
    what: str = "the model",
    **hub_kwargs: Any,
) -> str | None:
    """The path of ``filename`` (in ``subfolder``) of a local folder or a Hub repo, or None when it has no such file.

    A folder is looked into directly; anything else is a Hub repo id, resolved through ``hf_hub_download`` (its
    cache first when ``local_files_only`` or ``HF_HUB_OFFLINE``). ``what`` names the thing being loaded in errors
    ("the DiGSeg adapter"). Raises `OSError` when the repo itself cannot be had (see the module docstring).
    """
    source = str(folder_or_repo_id)
    if os.path.isdir(source):
        path = os.path.join(source, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import errors, hf_hub_download

    try:
        return hf_hub_download(source, filename, subfolder=subfolder, revision=revision, **hub_kwargs)
    except errors.HFValidationError as error:
        raise OSError(f"{source!r} is neither a local folder nor a valid Hugging Face Hub repo id.") from error
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as error:
        if repo_cached(source, hub_kwargs.get("cache_dir")):
            return None  # the cache answers for this repo, but not with this file
        raise OSError(
            f"Cannot load {what} {source!r}: it is not a local folder, not in the Hugging Face cache, and the Hub "
            "cannot be reached (offline, or HF_HUB_OFFLINE is set). Download it once with network access, or pass "
            "the path of a saved folder."
        ) from error
    except errors.EntryNotFoundError:  # caught after LocalEntryNotFoundError, one of its subclasses
        return None
    except errors.RepositoryNotFoundError as error:
        raise OSError(
            f"{source!r} is not a local folder and no such Hugging Face Hub repo is accessible (check the name, "
            "or pass `token=` for a private or gated repo)."
        ) from error
    except errors.RevisionNotFoundError as error:
        raise OSError(f"The Hub repo {source!r} has no revision {revision!r}.") from error


def is_hub_unreachable(error: BaseException | None) -> bool:
    """Whether an exception (or anything in its ``__cause__`` / ``__context__`` chain) means "the Hub cannot be
    reached": offline mode, a file neither cached nor downloadable, or a refused / timed-out / unresolvable
    connection. diffusers and transformers wrap these in their own `OSError`s, hence the walk."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError, socket.gaierror)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, unreachable):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers one request within ``timeout`` seconds (False in offline mode); any HTTP
    answer, even an error status, means reachable. huggingface_hub's own session is used (its proxies, certificates):
    its retries took over two minutes to load a cached CLIP checkpoint without a route to the Hub.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # the HTTP client's transport errors (DNS, refused, timeout, TLS): no route to the Hub
        return False
    return True


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` can be a Hub repo id (``name`` or ``org/name``), not a path that merely does not exist."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or os.path.isabs(source):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def require_hub_source(source: str | os.PathLike, what: str, **hub_kwargs: Any) -> None:
    """Return at once if ``source`` can be loaded (a local folder, a cached repo, or a Hub that answers); otherwise
    raise a one-line `OSError` naming ``source`` and the way out, instead of ~30 s of retries per file and a traceback
    that never says "offline". ``what`` names the thing loaded ("the base model"); of ``hub_kwargs`` only
    ``cache_dir`` and ``local_files_only`` matter.
    """
    from huggingface_hub import constants

    name = os.fspath(source)
    if os.path.isdir(name):
        return
    if not looks_like_hub_id(name):
        raise OSError(
            f"Cannot load {what} {name!r}: no such folder, and it is not a Hugging Face Hub repo id (check the path)."
        )
    if repo_cached(name, hub_kwargs.get("cache_dir")):
        return
    if constants.HF_HUB_OFFLINE or hub_kwargs.get("local_files_only"):
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True was passed"
        raise OSError(
            f"Cannot load {what} {name!r}: it is not a local folder and not in the Hugging Face cache, and {reason}. "
            "Download it once with network access, or pass the path of a local folder."
        )
    if hub_reachable():
        return
    raise OSError(
        f"Cannot load {what} {name!r}: it is not a local folder, not in the Hugging Face cache, and the Hub "
        f"({constants.ENDPOINT}) does not answer. Download it once with network access (then set HF_HUB_OFFLINE=1 "
        "to skip the Hub), or pass the path of a local folder."
    )
