"""Publishing an export to the Hugging Face Hub: ``push_to_hub(dir, repo_id)`` and ``compressx push``.

Through ``huggingface_hub``: the repo is created when it does not exist (``create_repo(exist_ok=True)``), the
branch when ``revision`` names one that does not, and the export's files are uploaded in one commit
(``upload_folder``), so the repo holds the whole export or, after a failure, what it held before; the same
push can simply be run again. The token comes from the usual places (``HF_TOKEN``, ``hf auth login``'s file),
the endpoint from ``HF_ENDPOINT``.

Before anything is sent the export is verified (``compressx.export.verify``: every file against its SHA-256), so
a corrupt export is never published, and only the files its manifest lists (plus the manifest) are uploaded.
Nothing local is changed. Every failure (offline, no token, a token the Hub refuses, a repo it may not write,
a server or network failure) is one ``PushError`` naming what to do.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from compressx.config import Block, option
from compressx.errors import ConfigError, PushError

log = logging.getLogger(__name__)

# The Hub's rule for a model repo id: "owner/name", each 1-96 of letters, digits, '-', '_', '.', not starting or
# ending with '-' or '.', no '--' or '..', the name not ending in '.git'.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN to a token with write access)"


@dataclasses.dataclass(frozen=True)
class PushSpec(Block):
    """A recipe's ``export.push_to_hub`` block: ``{repo_id: USER/NAME, private: bool, revision: branch,
    commit_message: str}``."""

    shape: ClassVar[str] = "{repo_id: USER/NAME, private: true}"

    repo_id: str = option(expected="a Hub model repo id, USER/NAME")
    private: bool = False
    revision: str | None = option(None, nonempty=True, doc="the branch to push to (created when missing)")
    commit_message: str | None = option(None, nonempty=True)

    def __post_init__(self) -> None:
        problem = repo_id_problem(self.repo_id)
        if problem:
            raise ConfigError(problem, path="repo_id")


@dataclasses.dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str | None
    files: dict[str, int]  # relative path -> bytes, what was (or, dry run, would be) uploaded
    card: dict[str, Any]  # the model card's metadata
    commit_url: str | None = None  # None for a dry run
    dry_run: bool = False
    skipped: tuple[str, ...] = ()  # files in the directory the manifest does not list: never uploaded


def repo_id_problem(repo_id: Any) -> str | None:
    """Why ``repo_id`` is not a Hub model repo id (``USER/NAME``); None when it is one."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        return (
            f"repo_id {repo_id!r} is not of the form USER/NAME (letters, digits, '-', '_', '.'; each part 1-96 "
            "characters, not starting or ending with '-' or '.')"
        )
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return f"repo_id {repo_id!r}: the Hub refuses '--', '..' and a name ending in '.git'"
    return None


parse_push_spec = PushSpec.from_dict  # the name callers know


def token_problem(token: str | None = None) -> str | None:
    """Why pushing cannot authenticate (no token anywhere, or offline mode); None when a token is found."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no network call: unset it to push"
    if token or get_token():
        return None
    return f"pushing needs a Hugging Face token and none was found: {LOGIN_HINT}"


def _card_metadata(directory: Path, files: list[str]) -> dict[str, Any]:
    if "README.md" not in files:
        return {}
    from huggingface_hub import ModelCard

    return ModelCard.load(directory / "README.md").data.to_dict()


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload the export ``directory`` to the Hub model repo ``repo_id`` in one commit; see the module docstring.

    Args:
        directory: a compressx export; verified (every file's SHA-256) before anything is sent.
        repo_id: ``USER/NAME``; created (``private`` or public) when it does not exist.
        revision: a branch to commit to (created from the default branch when missing); default: main.
        commit_message: default ``"Upload <name> with compressx"``.
        token: default: huggingface_hub's (``HF_TOKEN``, then the file ``hf auth login`` writes).
        dry_run: verify and return what would be uploaded (files and sizes, the card's metadata); send nothing.
    """
    from compressx.manifest import MANIFEST, unlisted_files, verify

    problem = repo_id_problem(repo_id)
    if problem:
        raise PushError(problem)
    directory = Path(directory)
    manifest = verify(directory)  # a corrupt export is never published
    names = sorted([*manifest["files"], MANIFEST])
    files = {name: (directory / name).stat().st_size for name in names}
    card = _card_metadata(directory, names)
    skipped = tuple(unlisted_files(directory))
    if skipped:
        log.warning("not uploading %s: the export's manifest does not list them", ", ".join(skipped))
    if dry_run:
        return PushResult(repo_id, revision, files, card, dry_run=True, skipped=skipped)
    problem = token_problem(token)
    if problem:
        raise PushError(problem)
    message = commit_message or f"Upload {directory.resolve().name} with compressx"
    with _hub_errors(repo_id, revision):
        from huggingface_hub import HfApi

        from compressx._version import __version__

        api = HfApi(token=token, library_name="compressx", library_version=__version__)
        log.info("pushing %d file(s) of %s to %s on %s", len(files), directory, repo_id, api.endpoint)
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the namespace's default
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            revision=revision,
            commit_message=message,
            allow_patterns=[glob.escape(name) for name in names],  # exactly the verified files
        )
    log.info("pushed %s: %s", repo_id, info.commit_url)
    return PushResult(repo_id, revision, files, card, commit_url=info.commit_url, skipped=skipped)


class _hub_errors:
    """Turn what huggingface_hub and the network raise into one ``PushError`` naming what to do."""

    def __init__(self, repo_id: str, revision: str | None) -> None:
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None or not isinstance(err, Exception) or isinstance(err, PushError):
            return False
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        rerun = "nothing was published (a commit is all or nothing) and nothing local changed; run the push again"
        where = f"{self.repo_id}" + (f" (branch {self.revision})" if self.revision else "")
        if isinstance(err, OfflineModeIsEnabled):
            raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub makes no network call: unset it to push")
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            status = err.response.status_code
            server = _server_message(err)
            if status == 401:
                raise PushError(
                    f"the Hub refused the token (HTTP 401{server}): it is invalid or expired; {LOGIN_HINT}"
                )
            if status == 403:
                raise PushError(
                    f"the token may not write to {where} (HTTP 403{server}): use a token with write access, or a "
                    "repo under your own name or an organization you can write to"
                )
            if status == 404:
                raise PushError(f"the Hub found no {where} (HTTP 404{server}); check the repo id and branch")
            if status >= 500:
                raise PushError(f"the Hub failed (HTTP {status}{server}) while pushing {where}; {rerun}")
            raise PushError(f"the Hub refused the push to {where} (HTTP {status}{server}); {rerun}")
        if isinstance(err, ValueError) and str(err).startswith("Invalid metadata in README.md"):
            raise PushError(f"the Hub refused the model card's metadata: {err}; {rerun} after fixing README.md")
        if _is_network_error(err):
            raise PushError(
                f"cannot reach the Hub at {constants.ENDPOINT} ({type(err).__name__}: {err}); check the network "
                f"connection (and HF_ENDPOINT if you set it); {rerun}"
            )
        return False


def _server_message(err: Any) -> str:
    message = getattr(err, "server_message", None)
    return f": {' '.join(str(message).split())[:200]}" if message else ""


def _is_network_error(err: BaseException) -> bool:
    """A connection / timeout error of the HTTP stack huggingface_hub uses (httpx, or requests in older ones)."""
    if isinstance(err, OSError):
        return True
    return any(cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") for cls in type(err).__mro__)
