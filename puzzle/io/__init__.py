"""Storage (local paths and ``s3://``) and artifacts (directories with a ``manifest.json``)."""
