"""napari plugin (npe2; manifest ``napari.yaml``): a dock widget that classifies an image layer or a folder.

Install with ``pip install "cadbcnn[napari]"`` and open *Plugins → Classify cells (cadbcnn)*. Nothing here is
imported by the rest of the runtime.
"""
