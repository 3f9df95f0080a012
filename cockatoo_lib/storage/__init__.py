"""Reading and writing where steps keep their outputs.

fileio (local outputs written whole or not at all), publish (the shared-storage contract:
publish once, read verified), remote (gs://, s3://, http(s):// with bounded waits).
"""
