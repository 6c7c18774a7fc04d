"""The review station's prediction service: one run per case however often it is asked for,
outputs where ``rano-response predict`` puts them, status rows for the page's worklist.

Runs without the web packages (the service is plain Python over the predict pipeline).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.inference.pipeline import read_prediction
from RANOResponseLib.review.store import Case, ReviewStore, make_verdict
from RANOResponseLib.web.predictions import NOT_PREDICTED, PREDICTED, PredictionService, output_folder, worklist_status


@pytest.fixture()
def service(tmp_path, case_pair, tiny_bundle):
    case = Case("P1_a_b", str(case_pair.baseline), str(case_pair.followup), "P1")
    svc = PredictionService([case], tmp_path / "predictions", tiny_bundle, "cpu")
    yield svc
    svc.shutdown()


def test_output_folder_is_the_worklists_or_one_per_case(tmp_path):
    own = Case("c", "/b", "/f", prediction=str(tmp_path / "given"))
    assert output_folder(own, tmp_path / "out") == tmp_path / "given"
    odd = Case("../../etc/x y", "/b", "/f")
    folder = output_folder(odd, tmp_path / "out")
    assert folder.parent == tmp_path / "out" and ".." not in folder.name and "/" not in folder.name


def test_concurrent_requests_run_one_prediction(service):
    assert service.progress("P1_a_b").state == NOT_PREDICTED
    barrier = threading.Barrier(6)
    states: list[str] = []

    def ask() -> None:
        barrier.wait()
        states.append(service.request("P1_a_b").state)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.wait("P1_a_b", timeout=300).state == PREDICTED
    assert service.runs == {"P1_a_b": 1}, "the same case was predicted more than once"
    # asked again once it is on disk: read, not recomputed
    assert service.request("P1_a_b").state == PREDICTED and service.runs["P1_a_b"] == 1
    summary = read_prediction(service.folder("P1_a_b"))
    assert summary["bundle"]["id"] == "tiny-test"
    assert Path(summary["inputs"]["baseline"]["CT1"]).parent == Path(service.cases["P1_a_b"].baseline)


def test_only_worklist_cases_can_be_predicted(service):
    with pytest.raises(RANOInputError, match="not in the worklist"):
        service.request("/etc/passwd")


def test_worklist_status_names_reviewers(service, tmp_path):
    with ReviewStore(tmp_path / "r.sqlite") as store:
        store.add_cases(list(service.cases.values()))
        case = service.cases["P1_a_b"]
        store.save(make_verdict(case, "bob", "PD", 4))
        store.save(make_verdict(case, "alice", "SD", 2))
        rows = worklist_status(store, service)
    assert rows == [{"case_id": "P1_a_b", "prediction": NOT_PREDICTED, "reviewed_by": ["alice", "bob"]}]
