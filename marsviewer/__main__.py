"""``python -m marsviewer [DATASET]``: napari with the Mars Viewer widget, on the sample by default."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m marsviewer", description=__doc__)
    parser.add_argument("dataset", nargs="?", help="a competition .npz or an image/mask folder")
    parser.add_argument("--no-sample", action="store_true", help="start without loading the sample")
    args = parser.parse_args(argv)

    import napari

    viewer = napari.Viewer(title="Mars Viewer")
    _, widget = viewer.window.add_plugin_dock_widget("marsviewer", "Mars Viewer")
    if args.dataset:
        widget.open_path(args.dataset)
    elif not args.no_sample:
        widget.load_sample()
    napari.run()


if __name__ == "__main__":
    main()
