"""The teaching layer, a consumer of the analyses beside ``viz/``: guided tours (:mod:`.tour`)."""
