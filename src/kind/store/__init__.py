"""Models on disk: model directories, parts directories (decompose, assemble), run checkpoints,
and opening any of them. May import: kind.io, kind.core, kind.data."""
