"""Weighted kNN on frozen encoder features (cosine, k = evaluate.knn_k, votes exp(cos / T), as in
InstDisc and DINO): nothing is trained, so the loop goes straight to the evaluation."""

from __future__ import annotations

from dsset.evaluate import features, probes
from dsset.methods.downstream import ClassificationMethod


class KnnMethod(ClassificationMethod):

  trains = False

  def finish(self, variables, workdir):
    del variables
    ev = self.config.evaluate
    extractor = features.make_extractor(self.config)  # first: it names a missing export
    num_classes = self.num_classes()
    data = self.split_features(extractor)
    train = data['train']
    scores = probes.knn_scores(train.features, train.labels, data[self.report_split].features,
                               num_classes, k=int(ev.knn_k), temperature=float(ev.knn_temperature))
    extra = {'knn_k': int(ev.knn_k), 'knn_temperature': float(ev.knn_temperature),
             **extractor.batch_stats_settings}
    return self.report(workdir, data, scores, num_classes, extra, curve=None)
