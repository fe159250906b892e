"""Stage 1: read samples, cut tiles at fixed physical size, embed them with a frozen encoder."""
