"""Flex Template entry point: build the pipeline from the launch parameters and submit it.

The launcher passes every template parameter as `--name=value`; the job is submitted and this
returns at once (a Flex Template launcher must not wait for the job to finish).
"""

import sys

from pipeline.run_job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
