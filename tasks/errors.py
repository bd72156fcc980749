"""Named errors: each says what went wrong and what to do. Only TransientError is retried."""


class PetalflowError(Exception):
    """Base of every error petalflow raises on purpose (bad input, bad data, failed gate)."""


class TransientError(PetalflowError):
    """An I/O failure that may succeed when tried again (network drop, 5xx, server down)."""


def is_transient_status(code: int) -> bool:
    """HTTP statuses worth retrying: request timeout, rate limit, server errors."""
    return code in (408, 429) or code >= 500


class DownloadError(PetalflowError):
    """A download failed for a reason retrying cannot fix (404, 403, bad URL)."""


class ServerBusy(PetalflowError):
    """The server refused for now (429, 503...) and asked, with Retry-After, to be asked again
    later than a run waits for: not retried within the run."""


class ChecksumMismatch(PetalflowError):
    """The downloaded bytes are not the archive that was asked for."""


class ArchiveError(PetalflowError):
    """The archive is unreadable or unsafe (traversal, links, devices, too large)."""


class DamagedArchive(ArchiveError):
    """The archive is a tar or zip that cannot be read to its end: cut short, or its bytes
    changed on the way or on disk (a checksum inside it disagrees). Nothing was extracted."""


class LinksInArchive(ArchiveError):
    """The archive holds symbolic links where photos were expected (class folders of links
    packed as they are): it must be packed again with the files the links point to."""


class WebPageNotArchive(ArchiveError):
    """Where the archive was expected, the URL gave a web page (a sign-in, a download
    confirmation or an error page answered with status 200): the source is wrong, not the data."""


class DatasetError(PetalflowError):
    """The dataset cannot be trained on as it is (too few classes or images)."""


class DatasetChanged(DatasetError):
    """Files the scan used are gone or changed since: the data (a folder source, or the
    extracted copy of an archive) changed while the run used it."""


class UnusableImages(DatasetError):
    """The class folders were found, but too few of them hold an image petalflow can use: their
    image files were all quarantined (a format TensorFlow cannot decode, such as TIFF or HEIC;
    damaged bytes). The layout is right; the files are not."""


class BackboneError(PetalflowError):
    """The backbone handle cannot be used (404, not a SavedModel) and retrying will not help."""


class ModelNotFound(PetalflowError):
    """A models:/ URI names a registered model that exists, but not that alias or version."""


class ModelUnreachable(PetalflowError):
    """A model URI naming another store (ftp://, s3://, gs://, …) whose host could not be
    found or reached."""


class TrackingServerUnreachable(PetalflowError):
    """MLFLOW_TRACKING_URI names a server that does not answer (not started, a wrong
    address): said at once by the commands a person runs, not after MLflow's retries."""


class StoreNotFound(PetalflowError):
    """A command that reads models found no MLflow store to read: no tracking URI, and no
    embedded store in the folder it runs in."""


class OutputNotWritable(PetalflowError):
    """The predictions file cannot be created where it was asked for (a folder the user cannot
    write, a read-only disk, a system folder): said before any image is classified."""


class DestinationInUse(PetalflowError):
    """A folder to save a pulled model into is a file, or holds files that are not a model."""


class TrainingHandoffError(PetalflowError):
    """The deployment the training step is handed to (``training_deployment``) cannot take it:
    it is not deployed on the run's Prefect server, or no worker of its pool came online."""


class TrainingTimeLimit(PetalflowError):
    """The training step ran longer than the run's ``max_training_hours`` and was stopped (a
    hung training, or more data than the limit was set for): nothing was registered."""


class FollowChampionError(PetalflowError):
    """A run that follows the champion (``follow_champion``) cannot train with what the
    champion recorded: no parameters, or ones this machine cannot use (a URL recorded without
    its credentials, a backbone folder it lacks)."""


class DiskFull(PetalflowError):
    """A disk a step writes to is full (or over its quota): named, with its free space. Not
    retried: freeing space is the user's to do."""
