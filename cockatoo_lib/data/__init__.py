"""The data step: sources read, validated, deduplicated, split and written as Parquet.

prepare (data configs, sources, labels, splits, the manifest), clip_images (a source's image
column for CLIP: fetching, decoding, cached pixels).
"""
