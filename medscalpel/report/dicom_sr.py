"""The clinical report of a DICOM image also as a DICOM Structured Report (highdicom), for
returning the model's calls to the PACS next to the image they are about.

One Comprehensive 3D SR per DICOM input, holding an Imaging Measurement Report (TID 1500) with
one image-level measurement group (TID 1501) that references the source image by its SOP Class
and SOP Instance UID (and lies in the source's study): per class, the model's probability
(``DCM 122157`` Probability is the concept's family; the class is a local ``99MEDSCALPEL``
code), its decision threshold, and whether the operating point calls the finding (``SCT``
Present / Absent; a finding hidden by ``--hide-exclusive`` is still called Present: the SR
records the model's calls, the HTML page what it shows). The algorithm is named (medscalpel,
its version, the model id and where the thresholds came from). The document is PRELIMINARY,
UNVERIFIED and PARTIAL: decision support, not a read.

No PHI out by default: highdicom copies the Patient and General Study modules of its
``evidence`` dataset into the SR (PatientName, PatientID, PatientBirthDate, PatientSex,
AccessionNumber, StudyID, StudyDate, ReferringPhysicianName, ...), so the evidence it is given
is not the source file but a stub holding only the UIDs that reference the image (study,
series, SOP instance, SOP class), the modality, the PatientID's pseudonym
(:func:`~medscalpel.data.dicom_read.pseudonym`, the same salt as every other output) and
``PatientIdentityRemoved = YES``. The UIDs stay: they are how DICOM references an image, so
the SR can be filed with its study; keep SR files inside the hospital as you keep UIDs.
``keep_identifiers=True`` (``report clinical --keep-identifiers``) gives highdicom the source's
own header instead: its patient and study attributes are copied, as the user asked.

Example:
    >>> ds = clinical_sr(report, "/site/scan.dcm")  # doctest: +SKIP
    >>> ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medscalpel import __version__
from medscalpel.data.dicom_read import is_dicom_path, load_salt, pseudonym, read_header
from medscalpel.errors import ConfigError, DataError, optional_import
from medscalpel.report.clinical import ClinicalReport
from medscalpel.runs import atomic_path

#: the local coding scheme of the class concepts (DICOM PS3.16 8.2: ``99`` = private)
SCHEME = "99MEDSCALPEL"
#: report statuses that mean the operating point calls the class (see ``ClinicalReport``)
CALLED = ("reported", "hidden", "decided")
#: attributes of the source copied to the de-identified evidence stub
REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
             "Modality")
#: Patient / General Study attributes highdicom reads from the evidence: left empty (type 2)
EMPTIED = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
           "StudyDate", "StudyTime", "ReferringPhysicianName")


def _hd():
    return optional_import("highdicom", "dicom", "writing DICOM Structured Reports")


def require_sr_inputs(paths: Sequence[str | os.PathLike]) -> list[bool]:
    """Which inputs get an SR (the DICOM ones), checked before any work: highdicom is
    installed and every DICOM input has the UIDs its SR references it by.

    Raises:
        ConfigError: no input is a DICOM file (an SR references a DICOM source image).
        DataError: a DICOM input is unreadable or lacks a UID (:data:`REFERENCE`).
        MissingExtraError: highdicom is missing (``pip install 'medscalpel[dicom]'``).
    """
    flags = [is_dicom_path(p) for p in paths]
    if not any(flags):
        raise ConfigError("The '--dicom-sr' option of medscalpel report clinical needs DICOM "
                          "images (.dcm): a Structured Report references its source DICOM "
                          "image. Got none; drop the option for PNG / JPEG inputs.")
    _hd()
    for p, dicom in zip(paths, flags):
        if dicom:
            _require_uids(read_header(p), p)
    return flags


def _require_uids(header: Any, path: str | os.PathLike) -> None:
    missing = [k for k in REFERENCE[:4] if not str(header.get(k, "") or "").strip()]
    if missing:
        raise DataError(f"DICOM file {path} lacks {', '.join(missing)}: a Structured Report "
                        f"references its source image by {', '.join(REFERENCE[:4])}. Leave out "
                        "--dicom-sr, or report this image without it.")


def evidence(header: Any, keep_identifiers: bool = False, salt: bytes | None = None) -> Any:
    """The dataset highdicom takes the SR's patient, study and reference attributes from: a
    de-identified stub of ``header`` (module docstring), or ``header`` itself when the user
    keeps identifiers.

    Raises:
        DataError: the source lacks a UID the reference needs.
    """
    from pydicom.dataset import Dataset  # pydicom: the optional [dicom] extra

    _require_uids(header, str(getattr(header, "filename", None) or "the source"))
    if keep_identifiers:
        return header
    stub = Dataset()
    for k in REFERENCE:
        if k in header:
            setattr(stub, k, header.get(k))
    for k in EMPTIED:
        setattr(stub, k, "")
    pid = str(header.get("PatientID", "") or "").strip()
    salt = load_salt()[0] if salt is None else salt
    stub.PatientID = pseudonym(pid, "patient", salt) if pid else ""
    stub.PatientIdentityRemoved = "YES"
    stub.DeidentificationMethod = "medscalpel: PatientID pseudonymised, rest not copied"
    return stub


def _code(value: str, meaning: str) -> Any:
    return _hd().sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _content(report: ClinicalReport, source: Any) -> Any:
    """The TID 1500 content: one image-level group referencing ``source``."""
    from pydicom.sr.codedict import codes  # pydicom: the optional [dicom] extra

    hd = _hd()
    model = report.model or {}
    algo = hd.sr.AlgorithmIdentification(
        name="medscalpel", version=str(__version__),
        parameters=[f"model_id={model.get('model_id') or 'unknown'}",
                    f"arch={model.get('arch') or 'unknown'}",
                    f"thresholds_calibrated={bool(model.get('thresholds_calibrated'))}"])
    measurements, evaluations = [], []
    for row in sorted(report.probabilities, key=lambda r: int(r["class_index"])):
        k, name = int(row["class_index"]), str(row["class"])
        measurements.append(hd.sr.Measurement(
            name=_code(f"P{k}", f"Probability of {name}"), value=float(row["probability"]),
            unit=codes.UCUM.NoUnits, algorithm_id=algo))
        if row.get("threshold") is not None:
            measurements.append(hd.sr.Measurement(
                name=_code(f"T{k}", f"Decision threshold for {name}"),
                value=float(row["threshold"]), unit=codes.UCUM.NoUnits, algorithm_id=algo))
        called = str(row.get("status", "")).startswith(CALLED)
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_code(f"F{k}", name), value=codes.SCT.Present if called else codes.SCT.Absent))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier="medscalpel clinical decision support"),
        algorithm_id=algo, finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)],
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID)])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="medscalpel", manufacturer_name="medscalpel",
            model_name=str(model.get("arch") or "model")[:64]))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.PlainRadiography, imaging_measurements=[group])


def clinical_sr(report: ClinicalReport, source_path: str | os.PathLike,
                keep_identifiers: bool = False, salt: bytes | None = None) -> Any:
    """The SR (a pydicom dataset) of one clinical report whose image is ``source_path``.

    Raises:
        DataError: the source is unreadable, lacks its UIDs, or highdicom refuses it.
    """
    hd = _hd()
    header = read_header(source_path)
    source = evidence(header, keep_identifiers, salt)
    try:
        content = _content(report, source)
        return hd.sr.Comprehensive3DSR(
            evidence=[source], content=content, series_instance_uid=hd.UID(), series_number=990,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medscalpel",
            is_complete=False, is_final=False, is_verified=False)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"Cannot write a DICOM Structured Report for {source_path}: {exc}."
                        ) from exc


def write_clinical_srs(reports: Sequence[ClinicalReport], sources: Sequence[str | os.PathLike],
                       out_dir: str | os.PathLike, keep_identifiers: bool = False
                       ) -> list[Path]:
    """Write ``<report name>.sr.dcm`` for every report whose source is a DICOM file (next to
    its ``.json``); returns the files written."""
    if len(reports) != len(sources):
        raise ConfigError(f"The 'sources' parameter of write_clinical_srs must name one image "
                          f"per report ({len(reports)}). Got {len(sources)} instead.")
    out = Path(out_dir)
    salt = None if keep_identifiers else load_salt()[0]
    written = []
    for i, (r, src) in enumerate(zip(reports, sources)):
        if not is_dicom_path(src):
            continue
        ds = clinical_sr(r, src, keep_identifiers, salt)
        stem = Path(r.json_path).stem if r.json_path else f"image{i}"
        path = out / f"{stem}.sr.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        written.append(path)
    return written


__all__ = ["clinical_sr", "evidence", "require_sr_inputs", "write_clinical_srs"]
