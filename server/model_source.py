"""Where a checkpoint named on the command line lives on this machine: an existing directory as
given, or a Hugging Face Hub id (`org/name`) resolved through huggingface_hub, as SGLang and vLLM
resolve it.

Invariants:
- A Hub id resolves through huggingface_hub's cache: the local cache first (HF_HOME,
  HF_HUB_CACHE, or --download-dir), a download otherwise, honouring HF_HUB_OFFLINE, HF_TOKEN and
  HF_ENDPOINT. Only what serving reads is fetched (SERVING_FILES): never `.bin` / `.pth` weights
  or the `original/` consolidated checkpoint, which for Scout would add about 200 GB.
- Every way it can fail (gated, unknown id, unknown revision, offline without the files, the Hub
  unreachable) is one ModelSourceError line naming the id and what to do; no traceback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pyllama4.serve")

# Config, generation config, tokenizer, chat template, processor config, safetensors + index.
SERVING_FILES = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
NOT_SERVING_FILES = ["original/*", "*.bin", "*.pth", "*.pt"]


class ModelSourceError(Exception):
    """The checkpoint cannot be found or fetched; str(e) is one line for the user, to follow
    the flag and the id."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the local directory to load
    repo_id: str | None = None  # the Hub id it was resolved from (None: a local directory)
    commit: str | None = None  # the Hub commit it was resolved to

    def describe(self) -> str:
        if self.repo_id is None:
            return str(self.path)
        return f"{self.repo_id} (Hugging Face Hub, commit {self.commit}) at {self.path}"


def is_hub_id(value: str) -> bool:
    """Whether `value` names a Hub repository rather than a local path: `org/name`, no such
    path here."""
    if value.startswith(("/", ".", "~")) or value.count("/") != 1:
        return False
    return not Path(value).exists() and all(value.split("/"))


def resolve(value: str, *, revision: str | None, download_dir: str | None) -> ModelSource:
    """The local checkpoint directory `value` names, downloading a Hub id's serving files if the
    cache lacks them (huggingface_hub's progress bar shows the download)."""
    if not is_hub_id(value):
        return ModelSource(Path(value).expanduser())
    if os.environ.get("SGLANG_USE_MODELSCOPE", "").lower() in ("1", "true"):
        log.warning(
            "SGLANG_USE_MODELSCOPE: ModelScope is not supported; %s resolves on the Hub", value
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = download_dir or constants.HF_HUB_CACHE
    endpoint = constants.ENDPOINT
    login = "set HF_TOKEN or run `hf auth login`"
    try:
        local = snapshot_download(
            value,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=SERVING_FILES,
            ignore_patterns=NOT_SERVING_FILES,
        )
    except GatedRepoError:  # before RepositoryNotFoundError: it is one
        raise ModelSourceError(
            "gated on the Hugging Face Hub: accept its license on its page, then "
            f"{login} with a token that has access"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"no such model on the Hugging Face Hub at {endpoint} (a private or gated "
            f"one needs a token: {login})"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"the Hub has no revision {revision!r} of it") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{endpoint} is unreachable"
        raise ModelSourceError(
            f"not in the Hugging Face cache {cache} and {why}: download it where the "
            f"Hub is reachable (hf download {value}), or give a local directory"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no answer"
        raise ModelSourceError(f"the Hub at {endpoint} answered {status}") from None
    return ModelSource(Path(local), value, Path(local).name)
