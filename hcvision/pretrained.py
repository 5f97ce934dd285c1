"""Where fine-tuning starts from: the ``pretrained=`` source of ``train_cls.py``, resolved to one local file.

Accepted sources (what timm users type):

* a local file: ``.safetensors``, ``.pth``, ``.pth.tar``, ``.pt``, ``.bin``; timm ``train.py`` checkpoints
  (``{"state_dict", "state_dict_ema", "args", ...}``) give their EMA weights, as timm's loader does;
* ``local-dir:DIR``: a directory in timm's ``save_for_hf`` layout (``hcvision.models.save_pretrained`` writes it);
* ``hf-hub:ORG/NAME[@REVISION]``: a Hub repository in that layout;
* a timm model name with or without tag, e.g. ``vit_small_patch16_224.augreg_in21k`` or
  ``vit_digits_patch2_8_res.hcv_digits`` (its pretrained cfg: a local file, a Hub id or a URL).

Hub and URL sources are taken from the local caches when present. Otherwise, with ``HF_HUB_OFFLINE=1``, or when the
host does not answer within :data:`PROBE_SECONDS` (checked before any download, which would retry for a minute),
they fail at once with a :class:`~hcvision.cli.UsageError` naming the local alternatives, before a run writes
anything.

Loading goes through timm's own pretrained path (``build_model_with_cfg`` -> ``load_pretrained``) with the file and
the *source's* class count and input channels in ``pretrained_cfg_overlay``. timm then does what it does for its own
weights: it keeps the head when the class count is the same and resets it otherwise, and adapts the patch embedding
to another ``in_chans``. hcvision's checkpoint filter gives every connection parameter the checkpoint lacks its
Pre-Norm-equivalent init (HC Eq. 14, FC Eq. 15), so an upcycled residual model computes its source's function.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

import torch

from . import io
from .cli import UsageError
from .models.convert import WEIGHTS_FILE_NAMES
from .models.loading import create_model

__all__ = ["PretrainedSource", "resolve_pretrained", "create_pretrained"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar")
HUB_FILES = WEIGHTS_FILE_NAMES  # timm save_for_hf / push_to_hf_hub names, safest first
LOCAL_ALTERNATIVES = ("a local file (pretrained=PATH.safetensors|.pth|.pth.tar|.bin), a directory in timm's "
                      "save_for_hf layout (pretrained=local-dir:DIR), or a timm tag whose file is local "
                      "(e.g. pretrained=vit_digits_patch2_8_res.hcv_digits); to fetch one, run "
                      "`huggingface-cli download ORG/NAME --local-dir DIR` where there is internet and pass "
                      "pretrained=local-dir:DIR")


@dataclass
class PretrainedSource:
    """A resolved ``pretrained=`` source: the file to load and what its tensors say about the source model."""

    spec: str  # what the user wrote
    kind: str  # "file", "local-dir", "hf-hub" or "timm"
    file: Path
    sha256: str
    num_classes: int  # rows of the source's classifier (0: the checkpoint has none)
    in_chans: int  # input channels of the source's patch embedding (0: not found)

    def record(self) -> Dict[str, Any]:
        """What results.json and the weights metadata keep about the start point."""
        return {"source": self.spec, "kind": self.kind, "file": str(self.file), "sha256": self.sha256}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


PROBE_SECONDS = 5.0  # a host that has not answered by then is taken as unreachable (huggingface_hub retries ~60 s)


def _answers(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds, name lookup included (in a
    thread: ``getaddrinfo`` itself has no timeout). Behind a proxy (``HTTPS_PROXY`` ...) the proxy is what must
    answer, as it is for the download itself."""
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (80 if parts.scheme == "http" else 443)
    answered = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            answered.append(True)
        except (OSError, UnicodeError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _unavailable(spec: str, why: str) -> UsageError:
    return UsageError(f"pretrained={spec!r} is not available here ({why}); accepted offline: {LOCAL_ALTERNATIVES}")


def _hub_file(spec: str, repo: str, filenames: Tuple[str, ...] = HUB_FILES) -> Path:
    """The first of ``filenames`` of Hub repo ``repo[@revision]``: from the local cache, else downloaded (online)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for name in filenames:
        cached = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
    if _offline():
        raise _unavailable(spec, f"Hub repository {repo_id!r} is not in the local Hugging Face cache and "
                                 "HF_HUB_OFFLINE is set")
    from huggingface_hub import constants

    if not _answers(constants.ENDPOINT):
        raise _unavailable(spec, f"Hub repository {repo_id!r} is not in the local Hugging Face cache and "
                                 f"{constants.ENDPOINT} did not answer within {PROBE_SECONDS:.0f} s")
    errors = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None))
        except Exception as err:  # missing file, no network, unknown repo, ...: all say "not here"
            errors.append(f"{name}: {type(err).__name__}")
    raise _unavailable(spec, f"could not download {' or '.join(filenames)} from {repo_id!r}: {'; '.join(errors)}")


def _url_file(spec: str, url: str) -> Path:
    """A timm URL source: torch hub's checkpoint cache, else downloaded (online)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if cached.is_file():
        return cached
    if _offline():
        raise _unavailable(spec, f"{url} is not in torch hub's cache {str(cached.parent)!r} and HF_HUB_OFFLINE is set")
    if not _answers(url):
        raise _unavailable(spec, f"{url} is not in torch hub's cache {str(cached.parent)!r} and its host did not "
                                 f"answer within {PROBE_SECONDS:.0f} s")
    from timm.models._hub import download_cached_file

    try:
        return Path(download_cached_file(url))
    except Exception as err:
        raise _unavailable(spec, f"could not download {url}: {type(err).__name__}") from None


def _local_dir_file(spec: str, directory: str) -> Path:
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise UsageError(f"pretrained={spec!r}: {str(d)!r} is not a directory; accepted: local-dir:DIR with "
                         f"{' or '.join(HUB_FILES)} (timm save_for_hf / hcvision.models.save_pretrained layout)")
    for name in HUB_FILES:
        if (d / name).is_file():
            return d / name
    raise UsageError(f"pretrained={spec!r}: {str(d)!r} is a directory without weights: looked for "
                     f"{' and '.join(HUB_FILES)}; accepted: a weights file, or a directory written by timm's "
                     "save_for_hf or hcvision.models.save_pretrained")


def _timm_file(spec: str) -> Optional[Path]:
    """The weights file of a timm name (``arch`` or ``arch.tag``); ``None`` if ``spec`` is no timm name."""
    import timm
    from timm.models import get_pretrained_cfg

    import hcvision.models  # noqa: F401  (hcvision's tags are timm tags once registered)

    if not timm.is_model(spec.split(".")[0]):
        return None
    try:
        cfg = get_pretrained_cfg(spec)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = list(timm.list_pretrained(f"{spec.split('.')[0]}.*"))[:6]
        raise UsageError(f"pretrained={spec!r}: timm has no such tag; tags of this model: {', '.join(tags) or 'none'}")
    if cfg.file:
        return Path(cfg.file)
    if cfg.hf_hub_id:
        return _hub_file(spec, cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES)
    if cfg.url:
        return _url_file(spec, cfg.url)
    raise UsageError(f"pretrained={spec!r}: timm lists no weights for it; accepted: {LOCAL_ALTERNATIVES}")


def resolve_pretrained(spec: str, head: str = "head", first_conv: str = "patch_embed.proj") -> PretrainedSource:
    """Find, read (safely: safetensors or ``torch.load(weights_only=True)``) and check the weights ``spec`` names.

    ``head`` and ``first_conv`` name the classifier and the patch embedding in the checkpoint (timm ViT names).
    Every failure is a :class:`UsageError` naming ``spec``.
    """
    spec = spec.strip()
    if spec.startswith("local-dir:"):
        kind, path = "local-dir", _local_dir_file(spec, spec[len("local-dir:"):])
    elif spec.startswith("hf-hub:"):
        kind, path = "hf-hub", _hub_file(spec, spec[len("hf-hub:"):])
    elif Path(spec).expanduser().is_file():
        kind, path = "file", Path(spec).expanduser()
    elif Path(spec).expanduser().is_dir():  # as timm's API takes one: its save_for_hf weights
        kind, path = "local-dir", _local_dir_file(spec, spec)
    elif (timm_path := _timm_file(spec)) is not None:
        kind, path = "timm", timm_path
    else:
        looks_like_path = "/" in spec or spec.endswith(WEIGHT_SUFFIXES)
        raise UsageError(f"pretrained={spec!r} " + ("does not exist" if looks_like_path else
                                                    "is neither a file nor a timm model name") +
                         f"; accepted: {LOCAL_ALTERNATIVES}, hf-hub:ORG/NAME, or a timm name such as "
                         "vit_small_patch16_224.augreg_in21k")
    # EMA weights first, as timm's loader does for train.py checkpoints (use_ema=True)
    state, _ = io.load_weights(path, what=f"pretrained={spec!r}", prefer_ema=True)
    io.check_finite(state, f"pretrained={spec!r} ({str(path)!r})")
    head_w, conv_w = state.get(f"{head}.weight"), state.get(f"{first_conv}.weight")
    return PretrainedSource(spec=spec, kind=kind, file=path, sha256=io.file_sha256(path),
                            num_classes=int(head_w.shape[0]) if head_w is not None and head_w.ndim == 2 else 0,
                            in_chans=int(conv_w.shape[1]) if conv_w is not None and conv_w.ndim == 4 else 0)


def create_pretrained(name: str, source: PretrainedSource, kwargs: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)`` from ``source``, adapted the way timm adapts.

    The overlay tells timm the source's class count and channels, so it keeps the head when it fits (e.g. 10 -> 10
    classes when upcycling) and resets it otherwise, and adapts the patch embedding to ``in_chans``. A checkpoint of
    another size or family is a :class:`UsageError` naming the tensors. The model's ``pretrained_cfg`` is the target
    architecture's again afterwards (its data config is what the data pipeline used).
    """
    import timm

    kwargs = dict(kwargs or {})
    target_cfg = create_model(name, kwargs, meta=True).pretrained_cfg
    overlay = dict(file=str(source.file), num_classes=source.num_classes,
                   input_size=(source.in_chans or target_cfg["input_size"][0], *target_cfg["input_size"][1:]))
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (ValueError, RuntimeError) as err:  # the filter names the tensors that do not fit
        raise UsageError(f"pretrained={source.spec!r} does not fit model={name!r}: "
                         f"{str(err).strip().splitlines()[0][:400]}") from None
    model.pretrained_cfg = model.default_cfg = dict(target_cfg)
    return model
