"""The gRPC servicer: thin. Validate and convert the request, call the engine, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from expunge.server.edge import converters as conv
from expunge.server.edge.interceptors import current_actor
from expunge.server.edge.rpc_status import handles_errors
from expunge.server.engine import EXPORT_CHUNK_BYTES, Engine, parse_model_name, parse_version_name
from expunge.server.errors import FailedPrecondition, NotFound, invalid_field
from expunge.server.forget.service import ForgetService
from expunge.server.scan.service import ScanService
from expunge.server.state.repository import read_repository
from expunge.server.state.upload import UPLOADS, RepositoryUpload
from expunge.v1 import expunge_pb2 as pb
from expunge.v1 import expunge_pb2_grpc as pb_grpc


def parse_operation_name(name: str) -> str:
    request_id = name.removeprefix("operations/")
    if not request_id:
        raise invalid_field("name", "expected 'operations/{request_id}'")
    return request_id


def actor_of(context: grpc.ServicerContext) -> str:
    """Who is calling, as the auth interceptor identified it (never the token itself)."""
    return current_actor()


class ExpungeServicer(pb_grpc.ExpungeServicer):
    def __init__(self, engine: Engine, forget: ForgetService, scans: ScanService) -> None:
        self.engine = engine
        self.forget = forget
        self.scans = scans
        self.max_bytes = engine.settings.max_message_bytes

    @handles_errors
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                conv.model_to_proto(i, self._index_status(i.row.name))
                for i in self.engine.list_models()
            ]
        )

    def _index_status(self, model: str) -> pb.IndexStatus:
        if self.forget.index is None:
            return pb.IndexStatus(state=pb.IndexStatus.ABSENT)
        s = self.forget.index.state(model)
        return pb.IndexStatus(
            state=pb.IndexStatus.State.Value(s.state),  # type: ignore[arg-type]
            embedded_version=s.embedded_version,
            size=s.size,
            progress=s.progress,
            embedded_parameters=list(s.embedded_parameters),
        )

    @handles_errors
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        name = parse_model_name(request.name)
        return conv.model_to_proto(self.engine.model_info(name), self._index_status(name))

    @handles_errors
    def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListVersionsResponse:
        rows, token = self.engine.list_versions(
            request.model, request.page_size, request.page_token
        )
        return pb.ListVersionsResponse(
            versions=[conv.version_to_proto(r) for r in rows], next_page_token=token
        )

    @handles_errors
    def ExportModel(
        self, request: pb.ExportModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportChunk]:
        model, version = parse_version_name(request.name)
        data, vrow = self.engine.export(model, version)
        for offset in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield pb.ExportChunk(
                data=data[offset : offset + EXPORT_CHUNK_BYTES],
                offset=offset,
                total_bytes=len(data),
                weights_sha256=vrow.weights_blob,
                version=vrow.version,
            )

    @handles_errors
    def ImportModel(
        self, requests: Iterator[pb.RepositoryChunk], context: grpc.ServicerContext
    ) -> pb.Model:
        settings = self.engine.settings
        upload = RepositoryUpload(self.engine.store.root / UPLOADS, settings.max_import_bytes)
        try:
            name = ""
            for chunk in requests:
                if chunk.name and chunk.name != name:
                    if name:
                        raise invalid_field("name", "every piece must name the same model")
                    name = parse_model_name(chunk.name)
                    self.engine.refuse_existing(name)  # before the rest is uploaded
                if not name:
                    raise invalid_field("name", "name the model to create on the first piece")
                upload.add(chunk.path, chunk.offset, chunk.data)
            if not name:
                raise invalid_field("name", "the upload was empty: send the repository's files")
            repository = read_repository(upload.root, settings.trusted_factories)
            info = self.engine.import_model(name, repository, actor_of(context))
        finally:
            upload.close()
        if self.forget.index is not None:  # as at start-up, without a restart
            self.forget.index.build_in_background(name)
        return conv.model_to_proto(info, self._index_status(name))

    @handles_errors
    def RollbackModel(
        self, request: pb.RollbackModelRequest, context: grpc.ServicerContext
    ) -> pb.Model:
        model, version = parse_version_name(request.name)
        if version == 0:
            raise invalid_field(
                "name", "name a version to roll back to: models/{model}/versions/{n}"
            )
        return conv.model_to_proto(self.engine.rollback(model, version, actor_of(context)))

    @handles_errors
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        if not request.HasField("inputs"):
            raise invalid_field("inputs", "required: a tensor of shape (batch, *input_spec.shape)")
        if request.version < 0:
            raise invalid_field("version", "must be 0 (current) or a version number")
        inputs = conv.tensor_to_numpy(request.inputs, "inputs", self.max_bytes)
        result = self.engine.predict(parse_model_name(request.model), inputs, request.version)
        return pb.PredictResponse(
            labels=result.labels.tolist(),
            probabilities=conv.numpy_to_tensor(result.probabilities),
            version=result.version,
        )

    @handles_errors
    def ListAudit(
        self, request: pb.ListAuditRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditResponse:
        rows, token = self.engine.audit(request.model, request.page_size, request.page_token)
        return pb.ListAuditResponse(
            events=[conv.audit_to_proto(r) for r in rows], next_page_token=token
        )

    # Forgetting -------------------------------------------------------------------------

    def _operation(self, request_id: str) -> pb.Operation:
        row = self.forget.engine.store.request(request_id)
        if row is None:
            raise NotFound(f"operation {request_id!r} not found")
        progress, _ = self.forget.jobs.progress(request_id)
        return conv.operation_to_proto(row, progress)

    @handles_errors
    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.Operation:
        options = conv.forget_options(request.options)
        row = self.forget.submit(
            request.model,
            list(request.sample_ids),
            list(request.owner_ids),
            request.request_id,
            options,
            actor_of(context),
            sample_keys=list(request.sample_keys),
        )
        return self._operation(row.request_id)

    @handles_errors
    def RetrainModel(
        self, request: pb.RetrainModelRequest, context: grpc.ServicerContext
    ) -> pb.Operation:
        row = self.forget.submit_retrain(request.model, request.request_id, actor_of(context))
        return self._operation(row.request_id)

    @handles_errors
    def GetOperation(
        self, request: pb.GetOperationRequest, context: grpc.ServicerContext
    ) -> pb.Operation:
        return self._operation(parse_operation_name(request.name))

    @handles_errors
    def WatchOperation(
        self, request: pb.GetOperationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Operation]:
        request_id = parse_operation_name(request.name)
        op = self._operation(request_id)
        yield op
        seen = -1
        while not op.done and context.is_active():
            _, seen = self.forget.jobs.progress(request_id)
            self.forget.jobs.wait_for_change(request_id, seen, timeout=1.0)
            latest = self._operation(request_id)
            if latest != op:
                op = latest
                yield op

    @handles_errors
    def ListOperations(
        self, request: pb.ListOperationsRequest, context: grpc.ServicerContext
    ) -> pb.ListOperationsResponse:
        states = conv.journal_states(request.states)
        rows, token = self.engine.operations(
            request.model, states, request.page_size, request.page_token
        )
        return pb.ListOperationsResponse(
            operations=[
                conv.operation_to_proto(r, self.forget.jobs.progress(r.request_id)[0]) for r in rows
            ],
            next_page_token=token,
        )

    @handles_errors
    def CancelOperation(
        self, request: pb.CancelOperationRequest, context: grpc.ServicerContext
    ) -> pb.Operation:
        request_id = parse_operation_name(request.name)
        self._operation(request_id)
        self.forget.jobs.cancel(request_id)
        return self._operation(request_id)

    @handles_errors
    def Scan(
        self, request: pb.ScanRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ScanResult]:
        model, inputs = self._scan_inputs(request)
        for outcome in self.scans.scan(
            model,
            inputs,
            request.estimator or "gas",
            request.max_implicated,
            request.mitigate,
            request.request_id,
            actor_of(context),
            request.dry_run,
        ):
            if self.scans.metrics is not None:
                self.scans.metrics.input_scanned(model, outcome.flagged)
            result = pb.ScanResult(
                index=outcome.index,
                predicted_label=outcome.predicted_label,
                target_score=outcome.target_score,
                threshold=outcome.threshold,
                flagged=outcome.flagged,
                counterfactual_drop=outcome.counterfactual_drop,
                implicated=[pb.ImplicatedSample(**s) for s in outcome.implicated],  # type: ignore[arg-type]
                model_version=outcome.model_version,
                p_value=outcome.p_value,
                influence_p_value=outcome.influence_p_value,
                group_outlier_z=outcome.group_outlier_z,
                control_drop=outcome.control_drop,
                drop_threshold=outcome.drop_threshold,
                decision=outcome.decision,
            )
            if outcome.mitigation is not None:
                result.mitigation.CopyFrom(pb.Mitigation(**outcome.mitigation))  # type: ignore[arg-type]
            yield result

    def _scan_inputs(self, request: pb.ScanRequest) -> tuple[str, np.ndarray]:
        if not request.HasField("inputs"):
            raise invalid_field(
                "inputs", "required: a non-empty tensor of shape (batch, *input_spec.shape)"
            )
        return parse_model_name(request.model), conv.tensor_to_numpy(
            request.inputs, "inputs", self.max_bytes
        )

    @handles_errors
    def EstimateScan(
        self, request: pb.ScanRequest, context: grpc.ServicerContext
    ) -> pb.ScanEstimate:
        model, inputs = self._scan_inputs(request)
        if request.mitigate and request.dry_run:
            raise invalid_field(
                "dry_run", "dry_run returns the mitigation plan without applying it; unset mitigate"
            )
        estimate = self.scans.estimate(
            model, inputs, request.estimator or "gas", request.mitigate, request.dry_run
        )
        return pb.ScanEstimate(**estimate)

    @handles_errors
    def Neighbors(
        self, request: pb.NeighborsRequest, context: grpc.ServicerContext
    ) -> pb.NeighborsResponse:
        if self.forget.index is None:
            raise FailedPrecondition(
                "this server runs without a gradient index (build_index = false)"
            )
        if not request.HasField("inputs"):
            raise invalid_field("inputs", "required: a tensor of shape (batch, *input_spec.shape)")
        model = parse_model_name(request.model)
        inputs = conv.tensor_to_numpy(request.inputs, "inputs", self.max_bytes)
        hits, state, version = self.forget.index.neighbors(
            model,
            inputs,
            request.k,
            request.mode or "proponents",
            request.label if request.filter_label else None,
        )
        self.engine.store.record_audit(
            actor_of(context),
            "neighbors",
            f"models/{model}",
            {"inputs": int(inputs.shape[0]), "k": request.k},
        )
        return pb.NeighborsResponse(
            results=[
                pb.NeighborList(
                    neighbors=[
                        pb.Neighbor(
                            sample_id=h.sample_id,
                            owner_id=h.owner_id,
                            label=h.label,
                            score=h.score,
                            sample_key=h.sample_key,
                        )
                        for h in row
                    ]
                )
                for row in hits
            ],
            stale=state.state != "READY",
            embedded_version=state.embedded_version,
            model_version=version,
        )
