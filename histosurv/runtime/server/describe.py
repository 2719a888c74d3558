"""A model version's serving facts as ``histosurv.v1.ModelDescription``: the typed records of its
manifest (gene order, clinical covariates, training encoder and µm/px, survival head), for clients
without the files."""

from __future__ import annotations

from ...data.covariates import ClinicalSpec
from ...data.encoder_record import EncoderRecord
from ..repository import ModelVersion
from ..triton_config import patch_mpp
from ._proto import slide_service_pb2 as spb

__all__ = ["describe_model", "encoder_message", "covariate_messages"]


def describe_model(version: ModelVersion, engine_key: str = "") -> spb.ModelDescription:
    info = version.info
    message = spb.ModelDescription(
        name=version.name,
        version=str(version.version),
        kind="patch_encoder" if info.is_encoder else "survival_model",
        architecture=info.architecture,
        gene_names=info.gene_names,
        modalities=info.modalities,
        engines=sorted(info.engines),
        engine=engine_key,
    )
    if info.survival is not None:
        message.survival.kind = info.survival.kind
        if info.survival.n_bins is not None:
            message.survival.n_bins = info.survival.n_bins
        message.survival.time_bins.extend(info.survival.time_bins or ())
        message.survival.risk_definition = info.survival.risk_definition
        message.survival.risk_scale = info.survival.risk_scale
        if info.survival.has_curves:
            message.survival.times.extend(info.survival.times)
            message.survival.groups.extend(info.survival.groups or ())
            message.survival.cutoffs.extend(info.survival.cutoffs)
            message.survival.grouping = info.survival.grouping or ""
            message.survival.fitted_on = info.survival.fitted_on
    if info.trained_on is not None:
        message.trained_on.CopyFrom(encoder_message(info.trained_on))
    if info.encoder is not None:
        message.encoder.CopyFrom(encoder_message(version.encoder_record))
    mpp = patch_mpp(info)
    if mpp is not None:
        message.patch_mpp = mpp
    if info.clinical is not None:
        message.clinical.extend(covariate_messages(info.clinical))
    return message


def covariate_messages(spec: ClinicalSpec) -> list[spb.ClinicalCovariate]:
    """The covariates in the 'clinical' tensor's order; a client sends a categorical value as its index in
    ``categories`` and a numeric one raw (mean and scale say what the graph standardises with)."""
    messages = []
    for c in spec.covariates:
        message = spb.ClinicalCovariate(name=c.name, kind=c.kind, categories=c.categories)
        if c.kind == "numeric":
            message.mean, message.scale = c.mean, c.scale
        messages.append(message)
    return messages


def encoder_message(record: EncoderRecord) -> spb.EncoderRecord:
    """The record with unknown fields left unset (proto3 ``optional``), not zero."""
    message = spb.EncoderRecord(name=record.name)
    for field in ("architecture", "feature_dim", "patch_size", "mpp", "input_size", "feature", "version"):
        value = getattr(record, field)
        if value is not None:
            setattr(message, field, value)
    if record.preprocessing is not None:
        p = record.preprocessing
        message.preprocessing.resize_filter = p.resize_filter
        message.preprocessing.mean.extend(p.mean)
        message.preprocessing.std.extend(p.std)
        if p.resize is not None:
            message.preprocessing.resize = p.resize
        if p.crop is not None:
            message.preprocessing.crop = p.crop
    if record.weights is not None:
        message.weights.source = record.weights.source
        message.weights.detail = record.weights.detail
        if record.weights.sha256 is not None:
            message.weights.sha256 = record.weights.sha256
    return message
