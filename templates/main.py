"""Flex Template entry point: build the pipeline from the launch parameters and submit it.

The launcher passes every template parameter as `--name=value`; the job is submitted and this
returns at once (a Flex Template launcher must not wait for the job to finish).

Workers must run this template's image (the package is installed nowhere else): without an
`sdk_container_image` parameter, Dataflow would start them on the stock Beam image, where
unpickling the pipeline fails and the job stalls. The image names itself
(`WALKEROS_KLAVIYO_IMAGE`, set at build time, templates/Dockerfile), and that is the default;
an image built without its name refuses to launch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

IMAGE_ENV = "WALKEROS_KLAVIYO_IMAGE"
OPTION = "--sdk_container_image"


class MissingImage(ValueError):
    """Neither the launch nor the image says which image the workers run."""


def with_worker_image(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """`argv` with `--sdk_container_image` set to this image unless the launch gave one."""
    if any(arg == OPTION or arg.startswith(OPTION + "=") for arg in argv):
        return list(argv)
    image = environ.get(IMAGE_ENV, "").strip()
    if not image:
        raise MissingImage(
            f"walkeros-klaviyo: this template's image does not name itself ({IMAGE_ENV} is "
            f"unset; build it with `make -C templates image`), and no sdk_container_image "
            f"was given: the workers would start without the package")
    return [*argv, f"{OPTION}={image}"]


if __name__ == "__main__":
    try:
        arguments = with_worker_image(sys.argv[1:], os.environ)
    except MissingImage as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    from pipeline.run_job import main

    sys.exit(main(arguments))
