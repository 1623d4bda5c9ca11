"""Helpers shared by the subcommands: consoles, image pairs, disparity files."""

from __future__ import annotations

from pathlib import Path

from compress.errors import DataError


def console():
    """A rich console; wide when not a terminal so tables in logs and pipes are not squeezed."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def save_map(path: Path, disp, what: str = "disparity") -> None:
    """Write a H x W float map as .npy, .pfm or a colour-mapped .png, by extension."""
    import numpy as np

    from compress.atomic import atomic_write
    from compress.data.io import write_disparity_png, write_pfm

    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        atomic_write(path, lambda tmp: np.save(tmp, disp.astype(np.float32), allow_pickle=False))
    elif suffix == ".pfm":
        write_pfm(path, disp.astype(np.float32))
    elif suffix == ".png":
        write_disparity_png(path, disp)
    else:
        raise DataError(f"--out {path}: unknown {what} format {suffix!r}; expected .npy, .pfm or .png")


def read_rgb(path: str):
    from PIL import Image

    from compress.data.io import read_image

    img = read_image(path)  # raises a DataError naming the file when unreadable
    with Image.open(path) as im:
        mode = im.mode
    if mode not in ("RGB", "RGBA"):
        raise DataError(f"{path} is a {mode!r} image; stereo models expect RGB colour images")
    return img


def read_pair(left: str, right: str):
    left_img, right_img = read_rgb(left), read_rgb(right)
    if left_img.shape != right_img.shape:
        raise DataError(
            f"left image {left} is {left_img.shape[1]}x{left_img.shape[0]} but right image {right} is "
            f"{right_img.shape[1]}x{right_img.shape[0]}; a rectified stereo pair has equal sizes"
        )
    return left_img, right_img
