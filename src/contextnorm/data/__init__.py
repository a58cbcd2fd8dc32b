"""Image data sets in memory: loaders for the published formats and the embedded two-domain digits.

Nothing here needs a GPU or Lightning; every loader returns an :class:`ImageData`. Register a
data set of your own in :data:`DATASETS` with a :class:`DatasetFormat`.
"""

from contextnorm.data.files import default_data_root
from contextnorm.data.formats import DatasetFormat
from contextnorm.data.image_data import ImageData
from contextnorm.data.loading import DATASETS, load_dataset

__all__ = ["DATASETS", "DatasetFormat", "ImageData", "default_data_root", "load_dataset"]
