"""Generated from proto/drsync.proto by scripts/gen_proto.py; do not edit."""
