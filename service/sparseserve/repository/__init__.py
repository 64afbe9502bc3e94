"""The model repository on disk: layout, versions, manifests."""
