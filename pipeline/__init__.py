"""The command line and the job assembly; the Beam stages are in `transforms`."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)


def version_line() -> str:
    """`walkeros-klaviyo --version`: this package and the Beam it runs on."""
    import apache_beam

    return f"walkeros-klaviyo {__version__} (apache-beam {apache_beam.__version__})"
