"""Generate one image from the command line with the in-process staged pipeline.

    python -m serve_app.generate --prompt "a red fox in snow" --seed 7 --out fox.png

With no --config the tiny offline model is used (a CPU demo: its random weights draw noise-like
pictures); pass a YAML from configs/ (e.g. configs/z-image-turbo.yaml) for real weights.
"""

from __future__ import annotations

import argparse
import json

import yaml
from PIL import Image

from serve_app.config import AppConfig


def load_app_config(path: str | None) -> AppConfig:
    if not path:
        return AppConfig()
    data = yaml.safe_load(open(path))
    if "applications" in data:  # a `serve run` file: take the first application's args
        data = data["applications"][0].get("args", {})
    return AppConfig.model_validate(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="image.png")
    p.add_argument("--config", help="YAML config (a serve run file or bare AppConfig); default: tiny model")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    args = p.parse_args(argv)

    from serve_app.pipeline import StagedPipeline

    cfg = load_app_config(args.config)
    default = 1024 if cfg.model.source != "tiny" else 256
    pipe = StagedPipeline(cfg)
    [img] = pipe.generate([args.prompt], [args.seed], height=args.height or default, width=args.width or default, steps=args.steps)
    Image.fromarray(img.pixels.numpy()).save(args.out)
    print(json.dumps({"out": args.out, "seed": img.seed, "timings_s": {k: round(v, 4) for k, v in img.timings_s.items()}}))


if __name__ == "__main__":
    main()
