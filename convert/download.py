"""Download a model from the Hugging Face Hub and convert it into our checkpoint directory.

    python -m convert.download HuggingFaceTB/SmolLM2-135M-Instruct             # -> checkpoints/HuggingFaceTB/SmolLM2...
    python -m convert.download meta-llama/Llama-3.2-1B --access_token hf_...   # gated: accept its terms first
    python -m convert.download Qwen/Qwen2.5-0.5B --revision REV --dtype bfloat16 --checkpoint_dir /data/checkpoints

Fetches only config.json, the weights from_hf.py reads (model*.safetensors, or pytorch_model*.bin when the repo has
no safetensors) and the tokenizer files into CHECKPOINT_DIR/hf/REPO_ID, then converts them into CHECKPOINT_DIR/REPO_ID.
Running it again fetches only what is missing or changed. Without --access_token the token is huggingface_hub's own
(HF_TOKEN, or the one `hf auth login` saved); HF_ENDPOINT points it at a mirror.
"""

import sys
from argparse import ArgumentError
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its network errors reach us unwrapped
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import filter_repo_objects
from jsonargparse import CLI

from checkpoint import TOKENIZER_FILES
from model import InputError
from convert.from_hf import DTYPES, convert

# The weights from_hf.py reads, in its order of preference. "model*" rather than "*.safetensors": Mistral's repos
# also hold consolidated.safetensors, a second full copy of the weights in another layout.
SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json"]
BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def download(repo_id: str, *, revision: str | None = None, access_token: str | None = None,
             checkpoint_dir: Path = Path("checkpoints"), dtype: str | None = None) -> Path:
    """Download a model from the Hugging Face Hub and convert it into our checkpoint directory.

    Args:
        repo_id: the model on the Hub, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.
        revision: branch, tag or commit to fetch; default: the repo's default branch.
        access_token: Hugging Face token for gated or private repos; default: HF_TOKEN or the saved login.
        checkpoint_dir: raw files go to checkpoint_dir/hf/REPO_ID, the converted checkpoint to checkpoint_dir/REPO_ID.
        dtype: cast the weights to float32, bfloat16 or float16; default: keep the stored dtype.
    """
    checkpoint_dir = Path(checkpoint_dir)
    # Separate directories: both hold a model.safetensors, with different tensor names
    hf_dir, out_dir = checkpoint_dir / "hf" / repo_id, checkpoint_dir / repo_id
    if dtype is not None and dtype not in DTYPES:  # before the download, not after gigabytes of it
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")

    api = HfApi(token=access_token)  # token None: huggingface_hub falls back to HF_TOKEN / the saved login
    try:
        # List the repo first so that a repo with both formats never sends the .bin files too
        info = api.model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        weights = next((p for p in (SAFETENSORS, BIN) if any(filter_repo_objects(files, allow_patterns=p))), None)
        if "config.json" not in files or weights is None:
            raise InputError(f"{repo_id}: not a transformers checkpoint that convert/from_hf.py reads (it needs "
                             f"config.json and model*.safetensors or pytorch_model*.bin; the repo has "
                             f"{', '.join(sorted(files)[:8]) or 'no files'}{'...' if len(files) > 8 else ''})")
        wanted = ["config.json", *TOKENIZER_FILES, *weights]
        # Pin the commit model_info saw, so the listing we chose from and the files we fetch agree
        snapshot_download(repo_id, revision=info.sha, local_dir=hf_dir, allow_patterns=wanted, token=access_token)
    except (HFValidationError, httpx2.HTTPError, OSError) as e:  # HfHubHTTPError is both of the last two
        raise InputError(explain(e, repo_id, revision, api.endpoint)) from None

    # A download of another revision may have left weights here that from_hf.py would prefer (an old index beside
    # a new single file); keep only this revision's files (subfolders such as .cache/ are huggingface_hub's).
    keep = set(filter_repo_objects(files, allow_patterns=wanted))
    for path in hf_dir.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()

    convert(hf_dir, out_dir=out_dir, dtype=dtype)
    if "tokenizer.json" not in files:  # e.g. repos with only a sentencepiece tokenizer.model
        print(f"note: {repo_id} has no tokenizer.json; scripts that tokenize need one in {out_dir}", file=sys.stderr)
    print(f"{repo_id} ({info.sha[:10]}) -> {out_dir}  (the Hugging Face files are in {hf_dir})")
    print(f"next: python -c \"from checkpoint import load_model; print(load_model('{out_dir}').config)\"")
    return out_dir


def explain(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> str:
    """One line that says what failed and what to do about it, for the errors huggingface_hub raises."""
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    # Order matters: GatedRepoError is a RepositoryNotFoundError, and every HfHubHTTPError is an OSError.
    if isinstance(e, GatedRepoError):
        return (f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} while logged in, then pass "
                "--access_token (or set HF_TOKEN) with a token of that account")
    if isinstance(e, RepositoryNotFoundError):
        return (f"{repo_id}: no such model on {endpoint}, or it is private: check the id, or pass --access_token "
                "with a token that can read it")
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} not found (expected a branch, tag or commit of the repo)"
    if isinstance(e, HfHubHTTPError) and e.response.status_code in (401, 403):  # a wrong token, or one too narrow
        return (f"{repo_id}: {endpoint} refused the token ({e.response.status_code}): check --access_token or HF_TOKEN "
                "and that the token may read this repo")
    if isinstance(e, HfHubHTTPError):
        return f"{repo_id}: {endpoint} answered {e.response.status_code}; try again later ({detail})"
    if isinstance(e, HFValidationError):
        return f"{repo_id!r}: not a valid repo id, expected ORG/NAME ({detail})"
    if isinstance(e, (httpx2.TransportError, ConnectionError, FileNotFoundError)):
        # FileNotFoundError: huggingface_hub's LocalEntryNotFoundError, what a lost connection mid-download becomes
        return (f"{repo_id}: cannot reach {endpoint} ({type(e).__name__}: {detail}); check the network, or set "
                "HF_ENDPOINT to a mirror")
    return f"{repo_id}: download failed ({type(e).__name__}: {detail})"  # e.g. disk full, a truncated transfer


if __name__ == "__main__":
    try:
        CLI(download, as_positional=True, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
