"""The OCI bridge: import images from registries, keep their layers as uncompressed
content-defined chunks plus a recipe to re-encode them byte-exact, and serve the OCI
pull API. See docs/oci.md for the design."""
