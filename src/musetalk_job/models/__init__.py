"""Model loading for the official MuseTalk layout (see ``layout``)."""
