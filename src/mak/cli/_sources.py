"""The image-source flags every command that reads images shares (one declaration, one opener)."""
from __future__ import annotations

import argparse

from mak.data.sources import FASHION_MNIST_DIR, ImageSource, open_source
from mak.errors import MakError


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """Add the image-source options: exactly one of --split/--folder/--array/--fashion-mnist/--webdataset."""
    group = parser.add_argument_group("image source (exactly one)")
    ex = group.add_mutually_exclusive_group(required=True)
    ex.add_argument("--split", metavar="FILE",
                    help="split file with lines 'relative/path [label ...]' (paths resolved against --root)")
    ex.add_argument("--folder", metavar="DIR",
                    help="image folder, searched recursively for jpg/jpeg/png/webp/bmp files")
    ex.add_argument("--array", metavar="FILE",
                    help=".npy/.npz uint8 array of images, N x H x W or N x H x W x C")
    ex.add_argument("--fashion-mnist", choices=("train", "test"), metavar="{train,test}",
                    help="Fashion-MNIST split, read from its IDX files")
    ex.add_argument("--webdataset", metavar="PATTERN",
                    help="WebDataset tar shards, e.g. 'pool-{000000..000099}.tar' (quote it); items are SHARD/KEY")
    group.add_argument("--labels-from-dirs", action="store_true",
                       help="with --folder: an ImageFolder layout, DIR/CLASS/...; the class folders (sorted) "
                            "are labels 0, 1, ...")
    group.add_argument("--root", metavar="DIR",
                       help="directory the --split paths are relative to (default: the split file's directory)")
    group.add_argument("--data-dir", metavar="DIR",
                       help=f"directory of the Fashion-MNIST IDX files (default: {FASHION_MNIST_DIR})")


def source_from_args(args: argparse.Namespace) -> ImageSource:
    """Open the source named by the options of :func:`add_source_args`."""
    for kind, attr in (("split", "split"), ("folder", "folder"), ("array", "array"),
                       ("fashion-mnist", "fashion_mnist"), ("webdataset", "webdataset")):
        value = getattr(args, attr, None)
        if value is not None:
            return open_source(kind, value, root=getattr(args, "root", None),
                               data_dir=getattr(args, "data_dir", None),
                               labels_from_dirs=getattr(args, "labels_from_dirs", False))
    raise MakError("no image source given: use --split, --folder, --array, --fashion-mnist or --webdataset")
