"""Imagebuild's use cases: commands, queries, the builder, build logs."""
