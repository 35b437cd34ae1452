"""python -m data_prep {imagenet,downsampled} SRC DST [options]"""
from __future__ import annotations

import sys

import click

from gait_ref.data.idx import DataFormatError

from .common import PrepError
from .downsampled import pack_downsampled
from .imagenet_tree import MAX_SIZE, RESIZES, pack_tree


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Pack image data into gait_ref HDF5 shards (resumable: rerun the same command)."""


@cli.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--size", default=64, show_default=True, type=click.IntRange(1, MAX_SIZE), help="Output side in pixels.")
@click.option("--resize", default="center-crop", show_default=True, type=click.Choice(RESIZES))
@click.option("--shard-size", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5 compression (default none).")
@click.option("--val-labels", type=click.Path(), help="Labels for a flat val/ folder.")
@click.option("--overwrite", is_flag=True, help="Empty DST and pack again (a rerun with other options needs it).")
@click.option("--quiet", is_flag=True)
def imagenet(src, dst, size, resize, shard_size, workers, compression, val_labels, overwrite, quiet):
    """Pack an ImageNet JPEG tree (train/<wnid>/*.JPEG, val/)."""
    _guard(pack_tree, src, dst, size=size, resize=resize, shard_size=shard_size, workers=workers,
           compression=compression, val_labels=val_labels, quiet=quiet, overwrite=overwrite)


@cli.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--shard-size", default=10000, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--compression", type=click.Choice(["gzip", "lzf"]))
@click.option("--overwrite", is_flag=True, help="Empty DST and pack again (a rerun with other options needs it).")
@click.option("--quiet", is_flag=True)
def downsampled(src, dst, shard_size, workers, compression, overwrite, quiet):
    """Pack the Chrabaszcz et al. downsampled ImageNet pickles (32 or 64 px)."""
    _guard(pack_downsampled, src, dst, shard_size=shard_size, workers=workers, compression=compression, quiet=quiet,
           overwrite=overwrite)


def _guard(func, *args, **kwargs):
    try:
        func(*args, **kwargs)
    except (PrepError, DataFormatError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
