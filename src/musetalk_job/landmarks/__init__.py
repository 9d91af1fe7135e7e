"""Face landmarks and face boxes: DWPose (no mmlab), an offline cascade backend, the official bbox recipe."""
