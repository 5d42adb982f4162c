"""The one labels CSV reader: optional header, integer ids or class names, names with extensions."""

import pytest

from data_pipelines.errors import DataError
from data_pipelines.sources.labels import Labels, read_labels_csv


def _csv(tmp_path, text):
  path = tmp_path / 'labels.csv'
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('header', ['', 'file,label\n', 'name,Label\n'])
def test_integer_labels_with_or_without_header(tmp_path, header):
  labels = read_labels_csv(_csv(tmp_path, header + 'a,0\n\nb,3\n'))
  assert labels.by_name == {'a': 0, 'b': 3} and labels.class_names == ()
  assert labels.num_classes == 4


def test_class_names_are_numbered_in_sorted_order(tmp_path):
  labels = read_labels_csv(_csv(tmp_path, 'scan,label\np1,tumour\np2,healthy\np3,tumour\n'))
  assert labels.class_names == ('healthy', 'tumour')
  assert [labels.label_for(n) for n in ('p1', 'p2', 'p3', 'p4')] == [1, 0, 1, -1]
  assert labels.num_classes == 2


def test_names_match_with_and_without_nifti_extensions(tmp_path):
  labels = read_labels_csv(_csv(tmp_path, 'case1.nii.gz,1\ncase2,2\nsub/case3.nii,3\n'))
  assert labels.label_for('case1') == 1 and labels.label_for('case1.nii') == 1
  assert labels.label_for('case2.nii.gz') == 2
  assert labels.label_for('sub/case3.nii.gz') == 3 and labels.label_for('case3.nii.gz') == -1
  # The first of several names that is listed wins (scan id before bare file name).
  assert labels.label_for('other/case2.nii', 'case2.nii') == 2
  assert Labels().label_for('case1') == -1 and Labels().num_classes == 0


@pytest.mark.parametrize('text, message', [
    ('a,1\nb\n', r'labels.csv:2: expected two non-empty cells'),
    ('a,1\nb,2,3\n', r'labels.csv:2: expected two'),
    ('a,1\n,2\n', r'labels.csv:2: expected two'),
    ('a,1\nb,healthy\n', r"labels.csv:2: label 'healthy' is not like the first row's; labels "
                         'must be all integers'),
    ('a,healthy\nb,1\n', r'labels.csv:2: .* must be all class names'),
    ('a,1\nb,-2\n', r'labels.csv:2: label -2 is negative'),
    ('name,label\na,1\n\na.nii.gz,1\n', r"labels.csv:4: 'a.nii.gz' is listed again \(first on "
                                        r'line 2\)'),
    ('name,label\n', r'holds no "name,label" rows'),
])
def test_malformed_rows_name_file_and_line(tmp_path, text, message):
  with pytest.raises(DataError, match=message):
    read_labels_csv(_csv(tmp_path, text))


def test_missing_or_undecodable_file_is_named(tmp_path):
  with pytest.raises(DataError, match='data.labels_csv: .*missing.csv is not a file'):
    read_labels_csv(str(tmp_path / 'missing.csv'))
  path = tmp_path / 'latin1.csv'
  path.write_bytes(b'caf\xe9,1\n')
  with pytest.raises(DataError, match='latin1.csv cannot be read'):
    read_labels_csv(str(path))
