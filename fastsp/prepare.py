"""Captioned images -> the latent shards the trainer reads (Stable Diffusion's VAE and CLIP text
encoder, or a diffusers pipeline's own encoders, from local folders).

python -m fastsp.prepare --images DIR --vae SD/vae --text-encoder SD/text_encoder \
        --resolution 512 --out LATENTS
python -m fastsp.prepare --images DIR --pipeline FLUX --resolution 1024 --out LATENTS
torchrun --nproc_per_node=8 -m fastsp.prepare ...            # the shards split across ranks
python fastsp/train.py --data LATENTS --cond context --resolution 64 ...   # the latent side

--pipeline takes a diffusers pipeline folder (StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusion3Pipeline or FluxPipeline, read from its model_index.json): its VAE and text
encoders, and its class's own `encode_prompt` (fastsp.pipeline_encoders). Its shards add
"pooled" [N, P] (SDXL, SD3, Flux) and, for SDXL, "time_ids" [N, 6] (each image's original size,
crop and target size); latents are (VAE mean - shift_factor) * scaling_factor; the empty prompt
gains "pooled" [P]; metadata.json adds "family", "pipeline_class", "pipeline_folder",
"shift_factor", "pooled_shape", "time_ids". --max-sequence-length sets SD3's and Flux's T5
prompt length (default the pipeline's: 256 and 512).

Captions: `NAME.txt` beside each image `NAME.png` (any of fastsp.image_folder.IMAGE_EXTENSIONS,
found recursively), or one `metadata.jsonl` in DIR with a {"file_name": ..., "text": ...} line per
image (the Hugging Face image-folder convention; file_name relative to DIR). With a metadata.jsonl
the .txt files are not read. An image without a caption, a metadata line without an image, and an
image PIL cannot decode are bad data: `--on-bad-data stop` (default) stops with the file's name,
`skip` leaves it out, warns and counts it in metadata.json.

Each image is read as training reads images (`fastsp.image_folder.load_image`: RGB, short side
resized to R, center-cropped to R x R, [-1, 1]) and encoded as StableDiffusionPipeline does
(fastsp.sd_components): latents = the VAE posterior's mean (or, with --sample-latents, a sample
seeded by (--seed, shard)) times the VAE's scaling factor, context = the text encoder's last
hidden state of the caption padded to the tokenizer's max length. Output, in --out:

    shard_00000.safetensors ...  "latents" [N, 4, R/f, R/f] and "context" [N, L, D] float32, N <=
                                 --shard-size images in sorted file order (f: the VAE's factor,
                                 8 for SD); the header's metadata holds the shard's manifest
    empty_prompt.safetensors     "context" [L, D]: the empty prompt "", what CFG dropout trains
                                 with and CFG sampling contrasts against
    metadata.json                written last, so its presence means complete: "format"
                                 "fastsp-latents", the scaling factor, resolution, latent and
                                 context shapes, the encoders' folders and configs, the options,
                                 the image count, the skipped files and the shard manifest

The latents carry the VAE's scaling factor: train with --latent-scale 1 (the default; anything
else is refused, see fastsp.latent_shards). Every file is written atomically (a temporary file and
a rename); a rerun into the same --out skips the shards already written after checking from their
manifest that they hold the same images and captions with the same options, and refuses (exit 2)
when they do not: pass another --out, or delete the folder, to prepare again. What a rerun is
decided by is the shards' content: the images and captions, the encoders' folders and every
option that changes a latent; --batch-size does not, so an out-of-memory kill can be rerun with a
smaller one. The checks of --out run before any model is loaded: a path that cannot be written,
a metadata.json fastsp did not write (a user's own file is never overwritten), options other
than those the folder was prepared with (named as options, even before metadata.json exists).
No non-finite latent or context is written: the image and shard are named. --out is locked while
prepare writes it (fastsp.run_folder.claimed, the trainer's lock). Under torchrun rank r writes
shards r, r + W, ...; rank 0 writes the empty prompt and metadata.json after a barrier, the
empty prompt again whenever it is missing or differs (the trainer requires it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsp import dist
from fastsp.checkpoint import atomic_write_bytes
from fastsp.cli import run_command
from fastsp.config_fields import ON_BAD_DATA
from fastsp.data_policy import skip_bad_file
from fastsp.errors import CheckpointWriteError, ConfigError, DataError
from fastsp.image_folder import IMAGE_EXTENSIONS, find_images, load_cropped_image
from fastsp.latent_shards import (
    EMPTY_PROMPT_FILE,
    MANIFEST_KEY,
    METADATA_FILE,
    METADATA_FORMAT,
    read_metadata,
)
from fastsp.pipeline_encoders import encoder_options, load_encoders, time_ids
from fastsp.run_folder import check_out_folder, claimed

__all__ = ["CaptionedImage", "find_captioned_images", "main", "plan_shards", "prepare"]

CAPTIONS_FILE = "metadata.jsonl"
METADATA_VERSION = 1
FIX_OUT = "pass another --out, or delete the folder to prepare it again"
RERUN = "the shards written so far are complete; rerun the same command, it skips them"


@dataclass(frozen=True)
class CaptionedImage:
    name: str  # the path relative to --images, with "/" (as metadata.jsonl's file_name)
    path: str
    caption: str


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _read_text(path: str) -> str:
    """A caption file's text; a DataError naming the file when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            f"save it as UTF-8 (iconv -f latin1 -t utf-8 converts Latin-1)"
        ) from None


def _read_captions_file(path: str) -> dict[str, str]:
    """file_name -> text of a metadata.jsonl; a DataError naming the line for a bad one."""
    captions: dict[str, str] = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"line {number} of '{path}' is not a JSON object with \"file_name\" and "
                f'"text" ({type(e).__name__}: {e}); fix or remove the line'
            ) from e
        if not isinstance(name, str) or not isinstance(text, str):
            raise DataError(
                f'line {number} of \'{path}\': "file_name" and "text" must be strings; fix the line'
            )
        name = Path(name).as_posix()
        if name in captions:
            raise DataError(
                f"line {number} of '{path}' captions '{name}' a second time; keep one line "
                f"per image"
            )
        captions[name] = text
    return captions


def find_captioned_images(
    root: str, on_bad_data: str = "stop", bad_files: list | None = None
) -> list[CaptionedImage]:
    """The captioned images under `root`, sorted by name (see the module docstring for the two
    caption conventions). A missing caption or a captioned file that does not exist raises a
    DataError ("stop") or is skipped, warned about and appended to `bad_files` ("skip")."""
    if not os.path.isdir(root):
        problem = "does not exist" if not os.path.exists(root) else "is a file, not a folder"
        raise DataError(f"--images '{root}' {problem}; pass a folder of captioned images")
    bad_files = [] if bad_files is None else bad_files

    def bad(path: str, reason: str) -> None:
        if on_bad_data == "stop":
            raise DataError(f"{reason}, or pass --on-bad-data skip to go on without it")
        skip_bad_file(bad_files, path, reason)

    paths = find_images(root)
    names = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
    captions_path = os.path.join(root, CAPTIONS_FILE)
    captions = _read_captions_file(captions_path) if os.path.isfile(captions_path) else None
    found = []
    for name, path in zip(names, paths, strict=True):
        if captions is not None:
            caption = captions.get(name)
            fix = f'add a line with "file_name": "{name}" to \'{captions_path}\''
        else:
            text_path = os.path.splitext(path)[0] + ".txt"
            caption = None
            fix = f"write its caption into '{text_path}'"
            if os.path.isfile(text_path):
                try:
                    caption = _read_text(text_path).strip()
                except DataError as e:
                    bad(path, str(e))
                    continue
        if caption is None:
            bad(path, f"image '{path}' has no caption; {fix}")
            continue
        found.append(CaptionedImage(name, path, caption))
    if captions is not None:
        for name in sorted(set(captions) - set(names)):
            path = os.path.join(root, name)
            bad(
                path,
                f"'{captions_path}' captions '{name}', which is not an image in '{root}' "
                f"({', '.join(IMAGE_EXTENSIONS)}); add the image or remove the line",
            )
    if not found:
        raise DataError(
            f"no captioned images in '{root}' ({len(paths)} image files, {len(bad_files)} "
            f"skipped); put images there with NAME.txt captions or a {CAPTIONS_FILE}"
        )
    _name_left_out(root, paths, captions is not None)
    return found


def _name_left_out(root: str, images: list[str], jsonl: bool) -> None:
    """Say which files under `root` prepare does not read (formats it does not decode, .txt
    captions without an image or beside a metadata.jsonl), never dropping them without a word;
    its own outputs (shards, metadata.json) and hidden files are not listed."""
    used = {os.path.realpath(p) for p in images}
    if not jsonl:
        used |= {os.path.realpath(os.path.splitext(p)[0] + ".txt") for p in images}
    left = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            ours = name.endswith(".safetensors") or name in (METADATA_FILE, CAPTIONS_FILE)
            if not (name.startswith(".") or ours or os.path.realpath(path) in used):
                left.append(os.path.relpath(path, root))
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        reason = "captions come from metadata.jsonl" if jsonl else "captions are NAME.txt"
        print(
            f"note: {len(left)} files in '{root}' are not read ({shown}): images are "
            f"{', '.join(IMAGE_EXTENSIONS)} and {reason}",
            file=sys.stderr,
        )


def plan_shards(images: list[CaptionedImage], shard_size: int) -> list[list[CaptionedImage]]:
    """Consecutive runs of `shard_size` images (the last may be shorter): shard i's images
    depend only on the images and the size, never on the number of ranks."""
    return [images[i : i + shard_size] for i in range(0, len(images), shard_size)]


def _digest(images: list[CaptionedImage]) -> str:
    listing = json.dumps([[image.name, image.caption] for image in images])
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _read_manifest(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {})[MANIFEST_KEY])
    except Exception as e:  # unreadable, or not written by fastsp.prepare
        raise ConfigError(
            f"'{path}' is not a shard fastsp.prepare wrote ({type(e).__name__}: {e}); {FIX_OUT}"
        ) from e


def _check_options(path: str, saved: dict, options: dict) -> None:
    """Refuse a file written with other options, naming every one that differs."""
    differ = [
        f"{key} {saved.get(key)!r} (now {value!r})"
        for key, value in options.items()
        if saved.get(key) != value
    ]
    if differ:
        raise ConfigError(f"'{path}' was prepared with {', '.join(differ)}; {FIX_OUT}")


def _check_same(path: str, manifest: dict, options: dict, images: list[CaptionedImage]) -> None:
    """Refuse a shard written with other options or from other images."""
    _check_options(path, manifest["options"], options)
    if manifest["images"] != _digest(images):
        raise ConfigError(
            f"'{path}' holds other images or captions than this run would put in it (the "
            f"--images folder changed); {FIX_OUT}"
        )


def _check_out_folder(out: str, planned: set[str]) -> None:
    """Refuse files in --out the trainer would read as shards but this run does not write."""
    if not os.path.isdir(out):
        return
    for entry in sorted(os.listdir(out)):
        if entry.startswith(".") or entry in planned or entry == EMPTY_PROMPT_FILE:
            continue
        if entry.endswith((".npy", ".safetensors")):
            raise ConfigError(
                f"--out '{out}' holds '{entry}', which is not a shard of this preparation (the "
                f"trainer would read it too); {FIX_OUT}"
            )


def _encode_shard(
    images: list[CaptionedImage],
    encoders,
    args: argparse.Namespace,
    generator: torch.Generator | None,
    bad_files: list,
    progress,
) -> tuple[dict[str, list[torch.Tensor]], list]:
    """({"latents": [[n, C, h, w], ...], "context": [[n, L, D], ...], and "pooled" / "time_ids"
    where the encoders give them}, skipped [[name, reason]]) of one shard's images, encoded in
    batches of --batch-size (fastsp.pipeline_encoders)."""
    tensors: dict[str, list[torch.Tensor]] = {}
    skipped = []
    for start in range(0, len(images), args.batch_size):
        batch, loaded = [], []
        chunk = images[start : start + args.batch_size]
        for image in chunk:
            try:
                loaded.append(load_cropped_image(image.path, args.resolution, channels=3))
                batch.append(image)
            except DataError as e:
                if args.on_bad_data == "stop":
                    raise
                reason = str(e.__cause__ or e)  # what PIL said, without the fix for "stop"
                skip_bad_file(bad_files, image.path, reason)
                skipped.append([image.path, reason])
        if batch:
            names = [image.path for image in batch]
            pixels = torch.stack([image.pixels for image in loaded])
            encoded = {"latents": encoders.encode_images(pixels, generator).float().cpu()}
            _check_finite(encoded["latents"], names, "latents", encoders.image_option)
            prompts = encoders.encode_prompts([image.caption for image in batch])
            for key, value in prompts.items():
                encoded[key] = value.float().cpu()
                _check_finite(encoded[key], names, f"text {key}", encoders.text_option)
            if encoders.time_ids:
                encoded["time_ids"] = torch.stack(
                    [time_ids(i.original_size, i.crop_top_left, args.resolution) for i in loaded]
                )
            for key, value in encoded.items():
                tensors.setdefault(key, []).append(value)
        progress.update(len(chunk))
    return tensors, skipped


def _check_finite(values: torch.Tensor, names: list[str], what: str, option: str) -> None:
    """Refuse non-finite rows of `values` [N, ...] (a damaged encoder's output), naming the
    first item: they would be written as if good and train nothing but NaN."""
    finite = torch.isfinite(values).flatten(1).all(1)
    if not finite.all():
        first = names[int((~finite).nonzero()[0])]
        raise ConfigError(
            f"the {option[2:]} gave non-finite {what} for {first} ({int((~finite).sum())} of "
            f"{len(names)} in its batch); nothing of its shard was written: check the weights "
            f"in {option} (a NaN or inf in them, or a dtype that overflows)"
        )


def _write_shard(path: str, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    from safetensors.torch import save

    data = save(
        {key: value.contiguous() for key, value in tensors.items()},
        metadata={MANIFEST_KEY: json.dumps(manifest)},
    )
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as e:  # nothing of this shard is left; the ones before it are complete
        raise CheckpointWriteError(
            f"cannot write '{path}': {e.strerror or e}; free space (or fix the cause): {RERUN}"
        ) from e


def _check_previous(out: str, options: dict, planned: set[str]) -> None:
    """Before any work: refuse an --out this run must not write into, naming why. A folder
    prepared with other options (read from metadata.json or, for an unfinished one, from its
    first shard's manifest: the option is named even when it changed the shard names), a
    metadata.json fastsp did not write, or shard files this run would not write."""
    check_out_folder(out)
    if not os.path.isdir(out):
        return
    metadata_path = os.path.join(out, METADATA_FILE)
    finished = read_metadata(out)  # a DataError for a damaged one: delete it and rerun
    if finished is None and os.path.exists(metadata_path):
        raise ConfigError(
            f"--out '{out}' holds a {METADATA_FILE} that fastsp.prepare did not write (no "
            f'"format": "{METADATA_FORMAT}"); prepare writes its own there and never overwrites '
            f"another's: pass another --out"
        )
    if finished is not None:
        _check_options(metadata_path, finished.get("options", {}), options)
    else:
        shards = sorted(e for e in os.listdir(out) if e.startswith("shard_"))
        if shards:
            path = os.path.join(out, shards[0])
            _check_options(path, _read_manifest(path)["options"], options)
    _check_out_folder(out, planned)


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write `data` unless the file holds it already (a rerun of a finished folder rewrites
    nothing, and writes again what was deleted or damaged)."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write '{path}': {e.strerror or e}; the shards are complete: free space "
            f"(or fix the cause) and rerun the same command, it skips them"
        ) from e


def prepare(args: argparse.Namespace) -> None:
    """Write --out (module docstring). Raises ConfigError / DataError (exit 2) on bad input."""
    for name in ("resolution", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use cpu")
    uncaptioned: list = []  # (path, reason) of the files find_captioned_images skipped
    images = find_captioned_images(args.images, args.on_bad_data, uncaptioned)
    sources = encoder_options(  # the encoders' folders, checked before any model is loaded
        args.pipeline, args.max_sequence_length, args.vae, args.text_encoder, args.tokenizer
    )
    # What a shard's bytes depend on besides its images: a rerun must match all of it. Not
    # --batch-size: the encoders treat each image alone (mean latents; samples are seeded per
    # shard), so a smaller batch after an out-of-memory kill finishes the same folder.
    options = {
        "resolution": args.resolution,
        "sample_latents": args.sample_latents,
        "seed": args.seed,
        "shard_size": args.shard_size,
        **sources,
    }
    shards = plan_shards(images, args.shard_size)
    names = [shard_name(i) for i in range(len(shards))]
    out = args.out
    _check_previous(out, options, set(names))  # on every rank: read-only, so all stop alike
    info = dist.init(args.device)
    with claimed(out, info.is_main, keep_lock_file=False):
        _prepare_into(out, args, info, images, uncaptioned, options, shards, names)


def _prepare_into(out, args, info, images, uncaptioned, options, shards, names) -> None:
    """The work of `prepare`, once --out is checked and locked."""
    bad_files: list = []
    encoders = load_encoders(
        args.pipeline, args.max_sequence_length, args.vae, args.text_encoder, args.tokenizer,
        info.device,
    )  # fmt: skip
    latent_shape = encoders.latent_shape(args.resolution)
    # {"context": [L, D], and "pooled": [P] where the family has one}
    empty = {k: v[0].float().cpu() for k, v in encoders.encode_prompts([""]).items()}
    for key, value in empty.items():
        what = f"the empty prompt's {key} embedding"
        _check_finite(value[None], ["the empty prompt"], what, encoders.text_option)
    os.makedirs(out, exist_ok=True)

    mine = list(range(info.rank, len(shards), info.world_size))
    from tqdm import tqdm

    with tqdm(
        total=sum(len(shards[i]) for i in mine),
        unit="img",
        desc=f"encoding into {out}",
        disable=not info.is_main,
        file=sys.stderr,
    ) as progress:  # closed on every way out: a message after it starts a line
        start = time.perf_counter()
        written = 0
        for index in mine:
            path = os.path.join(out, names[index])
            if os.path.exists(path):
                _check_same(path, _read_manifest(path), options, shards[index])
                progress.update(len(shards[index]))
                continue
            generator = (
                torch.Generator().manual_seed(args.seed * 1_000_003 + index)
                if args.sample_latents
                else None
            )
            tensors, skipped = _encode_shard(
                shards[index], encoders, args, generator, bad_files, progress
            )
            shapes = {"latents": latent_shape, **{k: v.shape for k, v in empty.items()}}
            if encoders.time_ids:
                shapes["time_ids"] = (6,)
            _write_shard(  # a shard whose images were all skipped holds empty tensors
                path,
                {k: torch.cat(tensors[k]) if k in tensors else torch.zeros((0, *shapes[k]))
                 for k in shapes},
                {"options": options, "images": _digest(shards[index]), "skipped": skipped},
            )  # fmt: skip
            written += 1
    dist.barrier()  # every shard is on disk before rank 0 describes them
    if not info.is_main:
        return
    manifest, skipped = [], [list(entry) for entry in uncaptioned]
    for name, planned in zip(names, shards, strict=True):
        shard = _read_manifest(os.path.join(out, name))
        skipped.extend(shard["skipped"])
        manifest.append(
            {
                "name": name,
                "num_images": len(planned) - len(shard["skipped"]),
                "images": shard["images"],
            }
        )
    from safetensors.torch import save

    metadata = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "resolution": args.resolution,
        "latent_shape": list(latent_shape),
        "context_shape": list(empty["context"].shape),
        **({"pooled_shape": list(empty["pooled"].shape)} if "pooled" in empty else {}),
        "num_images": sum(entry["num_images"] for entry in manifest),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "empty_prompt": EMPTY_PROMPT_FILE,
        "images_folder": os.path.abspath(args.images),
        **encoders.metadata(),  # the scaling factor, the encoders' folders and configs
        "options": options,
        "shards": manifest,
    }
    # The empty prompt first: metadata.json, the completion mark, is written last.
    empty_prompt = save({k: v.contiguous() for k, v in empty.items()})
    _write_if_changed(Path(out) / EMPTY_PROMPT_FILE, empty_prompt)
    if metadata != read_metadata(out):
        _write_if_changed(
            Path(out) / METADATA_FILE, (json.dumps(metadata, indent=1) + "\n").encode("utf-8")
        )
    seconds = time.perf_counter() - start
    print(
        f"prepared {metadata['num_images']} images ({metadata['num_skipped']} skipped) in "
        f"{len(names)} shards ({written} written by rank 0 in {seconds:.1f}s) into {out}: "
        f"latents {list(latent_shape)}, context {list(empty['context'].shape)}, scaling factor "
        f"{metadata['scaling_factor']}; train with --data {out} "
        + (
            f"--model diffusers --init {metadata['pipeline_folder']}"
            if "family" in metadata
            else f"--cond context --resolution {latent_shape[1]}"
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.prepare", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--images", required=True, help="folder of captioned images")
    parser.add_argument(
        "--pipeline",
        default=None,
        help="local diffusers pipeline folder (SD, SDXL, SD3, Flux): its VAE, text encoders "
        "and encode_prompt",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="T5 prompt length of an SD3 or Flux --pipeline (default its own: 256, 512)",
    )
    parser.add_argument("--vae", default=None, help="local AutoencoderKL (or pipeline) folder")
    parser.add_argument(
        "--text-encoder", default=None, help="local CLIPTextModel (or pipeline) folder"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="local CLIP tokenizer folder (default: beside the encoder)",
    )
    parser.add_argument(
        "--resolution", type=int, required=True, help="image side R (SD 2.1-base: 512)"
    )
    parser.add_argument("--out", required=True, help="output folder of latent shards")
    parser.add_argument(
        "--sample-latents",
        action="store_true",
        help="a sample of the VAE posterior (seeded by --seed and the shard) instead of its mean",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample-latents")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    parser.add_argument(
        "--on-bad-data",
        default="stop",
        choices=ON_BAD_DATA,
        help="an undecodable or uncaptioned image: stop with its name, or skip it (counted)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(prepare, build_parser().parse_args(argv), rerun=RERUN)


if __name__ == "__main__":
    sys.exit(main())
