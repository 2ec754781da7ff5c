// Host kernel of the attribution engine's input layout (CPU only; registered as p2t_host::layout_ids).
//
// From rows of token ids laid end to end, in one sequential pass per row:
//   text:      each token's piece (its bytes, or its code points) gathered through a table over the vocabulary
//              (one int64 per id: the piece's start, its length, whether the token is special);
//              UTF-8 rows are read as code points (a character starts at every byte that is not 10xxxxxx);
//   spans:     each token's character span, made contiguous (a gap joins the token after it, the last token
//              with text reaches the row's end, a token without text gets an empty span where it stands);
//   steps:     the text split at every occurrence of `split` (code points; empty: one step), each piece trimmed
//              of whitespace (the code points Python's str.isspace accepts), empty pieces dropped;
//   tokens:    each token's step: the step holding most of its characters (the earlier on a tie); an empty
//              span with text (the rest of a character split over tokens) the step of the token before it
//              (after it when it leads the row); an empty span without text (a special token) the step it
//              lies strictly inside, else none (-1);
//   PRM input: frame head, then per step its tokens with text (in token order) and the separator ids, then
//              the frame tail; steps that do not fit in max_length dropped from the end (their tokens -1);
//              the readout position of each kept step; the map from PRM positions onto row tokens.
// This is the vectorised NumPy path of p2t/attribution/layout.py (Layout._rows_ids) in one pass: the two
// are tested equal on random rows, and the Python layer takes the NumPy path where this kernel is absent.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace p2t {
namespace {

// Python's str.isspace for one code point (Py_UNICODE_ISSPACE: bidirectional WS, B, S or category Zs).
inline bool is_space(int32_t c) {
  if (c < 128) return c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code points of UTF-8 bytes, one per byte that starts a character (a lenient decode: a malformed
// sequence still gives one code point per leading byte, so positions match the character count; the
// Python layer rejects rows that do not decode strictly and takes its general path for them).
inline void utf8_code_points(const uint8_t* s, int64_t n, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t i = 0; i < n;) {
    const uint8_t b = s[i];
    if ((b & 0xC0) == 0x80) {  // a continuation byte that no leading byte claimed: no character
      ++i;
      continue;
    }
    int len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 1;
    int32_t c = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    int k = 1;
    for (; k < len && i + k < n && (s[i + k] & 0xC0) == 0x80; ++k) c = (c << 6) | (s[i + k] & 0x3F);
    out.push_back(c);
    i += k;
  }
}


// table[t] of token t: its piece's start << 17 | its length << 1 | 1 when it is special (no text of its own).
// One 8-byte entry per token: the ids of a large vocabulary are read at random, one cache miss each.
inline int64_t piece_start(int64_t e) { return e >> 17; }
inline int64_t piece_len(int64_t e) { return (e >> 1) & 0xFFFF; }
inline bool is_special(int64_t e) { return e & 1; }

struct Args {
  const int64_t *ids, *off, *table, *frame, *frame_off, *row_frame, *sep;
  const int32_t* split;
  int64_t B, V, F, nsplit, nsep_all, nsep, max_length, npieces;
  bool read_last;
};

inline int64_t* i64(at::Tensor& t) { return t.data_ptr<int64_t>(); }

// Pass 1, one row: character spans (contiguous), steps, each token's step, step sizes and truncation.
// Appends the row's steps (row-local character spans) and their token counts; returns the kept steps.
template <typename unit_t>
int64_t row_steps(const Args& A, int64_t r, const unit_t* units, int64_t nunits, int64_t* span, int64_t* g,
                  std::vector<int64_t>& steps, std::vector<int64_t>& counts, std::vector<int32_t>& cps,
                  std::vector<char>& cont, int64_t* total_out, int64_t* first_out) {
  constexpr bool utf8 = sizeof(unit_t) == 1;
  const int64_t t0 = A.off[r], n = A.off[r + 1] - A.off[r];
  // raw character spans: a character starts at every unit (UTF-8: every byte that is not 10xxxxxx)
  int64_t chars = 0, u = 0, last = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t m = piece_len(A.table[A.ids[t0 + i]]);
    const int64_t a = chars;
    if (utf8) {
      for (int64_t j = 0; j < m; ++j) chars += (static_cast<uint8_t>(units[u + j]) & 0xC0) != 0x80;
    } else {
      chars += m;
    }
    u += m;
    span[2 * i] = a;
    span[2 * i + 1] = chars;
    if (chars > a) last = i;
  }
  const int64_t len = chars;
  // contiguous: s_i = max(0, e_0 .. e_{i-1}), end_i = max(s_i, e_i), e = the raw end for tokens with text
  // (the last of them: the row's end), 0 for the others
  int64_t run = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = span[2 * i + 1] > span[2 * i] ? (i == last ? len : span[2 * i + 1]) : 0;
    span[2 * i] = run;
    span[2 * i + 1] = run = e > run ? e : run;
  }
  const int32_t* text;
  if (utf8) {
    utf8_code_points(reinterpret_cast<const uint8_t*>(units), nunits, cps);
    text = cps.data();
  } else {
    text = reinterpret_cast<const int32_t*>(units);
  }
  // steps: split, trim, drop empty pieces
  const int64_t s_begin = static_cast<int64_t>(steps.size()) / 2;
  for (int64_t pos = 0;;) {
    int64_t end = len;
    if (A.nsplit > 0) {
      for (int64_t q = pos; q + A.nsplit <= len; ++q) {
        if (text[q] == A.split[0] && std::memcmp(text + q, A.split, A.nsplit * sizeof(int32_t)) == 0) {
          end = q;
          break;
        }
      }
    }
    int64_t s = pos, t = end;
    while (s < t && is_space(text[s])) ++s;
    while (t > s && is_space(text[t - 1])) --t;
    if (t > s) {
      steps.push_back(s);
      steps.push_back(t);
    }
    if (end == len) break;
    pos = end + A.nsplit;
  }
  const int64_t K = static_cast<int64_t>(steps.size()) / 2 - s_begin;
  const int64_t* st = steps.data() + 2 * s_begin;
  // each token's step
  cont.assign(n, 0);
  for (int64_t i = 0, k = 0; i < n; ++i) {
    const int64_t a = span[2 * i], b = span[2 * i + 1];
    g[i] = -1;
    while (k < K && st[2 * k + 1] <= a) ++k;  // the first step ending after the token's start
    if (b > a) {
      int64_t best_ov = 0;
      for (int64_t j = k; j < K && st[2 * j] < b; ++j) {
        const int64_t ov = (b < st[2 * j + 1] ? b : st[2 * j + 1]) - (a > st[2 * j] ? a : st[2 * j]);
        if (ov > best_ov) {
          best_ov = ov;
          g[i] = j;
        }
      }
    } else if (is_special(A.table[A.ids[t0 + i]])) {  // no text: the step it lies strictly inside
      if (k < K && st[2 * k] < a && a < st[2 * k + 1]) g[i] = k;
    } else {
      cont[i] = 1;  // text but no character of its own: the rest of a character split over tokens
    }
  }
  for (int64_t i = 0, anchor = -1; i < n; ++i) {
    if (!cont[i]) {
      anchor = i;
    } else if (anchor >= 0) {
      g[i] = g[anchor];
    } else {  // leading: the first token after it that is not a continuation
      int64_t f = i;
      while (f < n && cont[f]) ++f;
      g[i] = f < n ? g[f] : -1;
    }
  }
  // step sizes (tokens with text), truncation to max_length (a prefix of the steps: sizes are >= 0)
  const int64_t c0 = static_cast<int64_t>(counts.size());
  counts.resize(c0 + K, 0);
  int64_t* cnt = counts.data() + c0;
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] >= 0 && (span[2 * i + 1] > span[2 * i] || !is_special(A.table[A.ids[t0 + i]]))) ++cnt[g[i]];
  }
  const int64_t fh = 2 * A.row_frame[r];
  const int64_t frame_n = A.frame_off[fh + 2] - A.frame_off[fh];
  int64_t total = frame_n, keep = K;
  for (int64_t j = 0; j < K; ++j) total += cnt[j] + A.nsep_all;
  if (A.max_length >= 0 && K > 0 && total > A.max_length) {
    int64_t cum = frame_n;
    keep = 0;
    while (keep < K && cum + cnt[keep] + A.nsep_all <= A.max_length) cum += cnt[keep++] + A.nsep_all;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] >= keep) g[i] = -1;
  }
  *total_out = total;
  *first_out = frame_n + (K > 0 ? cnt[0] + A.nsep_all : 0);
  return keep;
}

template <typename unit_t>
std::vector<at::Tensor> layout(const Args& A, const unit_t* pieces, at::ScalarType unit_type) {
  const int64_t B = A.B, n = A.off[B];
  const auto L = at::kLong;
  // the pieces of every token, gathered (one pass of independent table reads first: a large vocabulary is
  // read at random, and many misses can then be in flight at once)
  auto unit_off = at::empty({B + 1}, L);
  int64_t* uo = i64(unit_off);
  uo[0] = 0;
  for (int64_t r = 0; r < B; ++r) {
    int64_t units = 0;
    for (int64_t i = A.off[r]; i < A.off[r + 1]; ++i) {
      const int64_t t = A.ids[i];
      TORCH_CHECK(t >= 0 && t < A.V, "layout_ids: ids[", i, "] = ", t, " is outside the table [0, ", A.V, ")");
      const int64_t e = A.table[t];
      TORCH_CHECK(e >= 0 && piece_start(e) + piece_len(e) <= A.npieces, "layout_ids: table[", t,
                  "] points outside pieces");
      units += piece_len(e);
    }
    uo[r + 1] = uo[r] + units;
  }
  auto buf = at::empty({uo[B]}, unit_type);
  unit_t* dst = static_cast<unit_t*>(buf.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = A.table[A.ids[i]];
    const unit_t* p = pieces + piece_start(e);
    const int64_t m = piece_len(e);
    for (int64_t j = 0; j < m; ++j) dst[j] = p[j];
    dst += m;
  }
  // pass 1: spans, steps, each token's step, truncation; the sizes of every row's PRM input
  auto spans = at::empty({n, 2}, L), policy_step = at::empty({n}, L), keep = at::empty({B}, L),
       total = at::empty({B}, L), first = at::empty({B}, L), step_off = at::empty({B + 1}, L),
       prm_off = at::empty({B + 1}, L), ro_off = at::empty({B + 1}, L), m_off = at::empty({B + 1}, L);
  int64_t *so = i64(step_off), *po = i64(prm_off), *roo = i64(ro_off), *mo = i64(m_off);
  so[0] = po[0] = roo[0] = mo[0] = 0;
  std::vector<int64_t> steps, counts;
  std::vector<int32_t> cps;
  std::vector<char> cont;
  const unit_t* units = static_cast<const unit_t*>(buf.data_ptr());
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(A.row_frame[r] >= 0 && A.row_frame[r] < A.F, "layout_ids: row_frame[", r, "] is outside [0, ", A.F,
                ")");
    const int64_t t0 = A.off[r];
    const int64_t kept = row_steps<unit_t>(A, r, units + uo[r], uo[r + 1] - uo[r], i64(spans) + 2 * t0,
                                           i64(policy_step) + t0, steps, counts, cps, cont, i64(total) + r,
                                           i64(first) + r);
    i64(keep)[r] = kept;
    so[r + 1] = static_cast<int64_t>(steps.size()) / 2;
    int64_t tokens = 0;
    for (int64_t j = so[r]; j < so[r] + kept; ++j) tokens += counts[j];
    const int64_t fh = 2 * A.row_frame[r];
    const bool live = kept > 0;
    po[r + 1] = po[r] + (live ? A.frame_off[fh + 2] - A.frame_off[fh] + tokens + kept * A.nsep_all : 0);
    roo[r + 1] = roo[r] + kept;
    mo[r + 1] = mo[r] + tokens;
  }
  // pass 2: the PRM inputs: frame head, per kept step its tokens with text in token order and the separator,
  // frame tail; readouts; the map from PRM positions onto the row's tokens
  auto input_ids = at::empty({po[B]}, L), token_step = at::empty({po[B]}, L), readout = at::empty({roo[B]}, L),
       map_prm = at::empty({mo[B]}, L), map_policy = at::empty({mo[B]}, L);
  int64_t *ids_o = i64(input_ids), *ts_o = i64(token_step), *ro = i64(readout), *mp = i64(map_prm),
          *mq = i64(map_policy);
  const int64_t *g_all = i64(policy_step), *sp_all = i64(spans);
  std::vector<int64_t> slot, mslot;
  for (int64_t r = 0; r < B; ++r) {
    const int64_t kept = i64(keep)[r];
    if (kept == 0) continue;
    const int64_t t0 = A.off[r], nr = A.off[r + 1] - t0, P = po[r], fh = 2 * A.row_frame[r];
    const int64_t *g = g_all + t0, *sp = sp_all + 2 * t0, *cnt = counts.data() + so[r];
    int64_t at = 0;
    const auto put = [&](int64_t id, int64_t step) {
      ids_o[P + at] = id;
      ts_o[P + at] = step;
      ++at;
    };
    for (int64_t q = A.frame_off[fh]; q < A.frame_off[fh + 1]; ++q) put(A.frame[q], -1);
    // where each step's tokens start, in the input and in the map (a stable counting sort by step)
    slot.assign(kept, 0);
    mslot.assign(kept, 0);
    int64_t pos = at, m = mo[r];
    for (int64_t j = 0; j < kept; ++j) {
      slot[j] = pos;
      mslot[j] = m;
      m += cnt[j];
      const int64_t sep_at = pos + cnt[j];
      for (int64_t q = 0; q < A.nsep_all; ++q) {
        ids_o[P + sep_at + q] = A.sep[q];
        ts_o[P + sep_at + q] = -1;
      }
      if (!A.read_last) ro[roo[r] + j] = sep_at + A.nsep - 1;
      pos = sep_at + A.nsep_all;
    }
    for (int64_t i = 0; i < nr; ++i) {
      if (g[i] < 0 || !(sp[2 * i + 1] > sp[2 * i] || !is_special(A.table[A.ids[t0 + i]]))) continue;
      const int64_t p = slot[g[i]]++, mi = mslot[g[i]]++;
      ids_o[P + p] = A.ids[t0 + i];
      ts_o[P + p] = g[i];
      mp[mi] = p;
      mq[mi] = i;
    }
    at = pos;
    for (int64_t q = A.frame_off[fh + 1]; q < A.frame_off[fh + 2]; ++q) put(A.frame[q], -1);
    TORCH_INTERNAL_ASSERT(at == po[r + 1] - P);
    if (A.read_last) {
      for (int64_t j = 0; j < kept; ++j) ro[roo[r] + j] = at - 1;
    }
  }
  auto steps_t = at::empty({static_cast<int64_t>(steps.size()) / 2, 2}, L);
  if (!steps.empty()) std::memcpy(i64(steps_t), steps.data(), steps.size() * sizeof(int64_t));
  return {buf,   unit_off,    spans,   steps_t,    step_off, policy_step, keep,    total,     first,
          input_ids, token_step, prm_off, readout, ro_off,   map_prm,     map_policy, m_off};
}

std::vector<at::Tensor> layout_ids_cpu(const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& pieces,
                                       const at::Tensor& table, const at::Tensor& split, const at::Tensor& frame,
                                       const at::Tensor& frame_offsets, const at::Tensor& row_frame,
                                       const at::Tensor& separator, int64_t separator_readout, int64_t max_length,
                                       bool read_last) {
  for (auto* t : {&ids, &offsets, &table, &frame, &frame_offsets, &row_frame, &separator}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "layout_ids: the index arguments must be contiguous 1-D int64 tensors");
  }
  TORCH_CHECK(pieces.dim() == 1 && pieces.is_contiguous() &&
                  (pieces.scalar_type() == at::kByte || pieces.scalar_type() == at::kInt),
              "layout_ids: pieces must be a contiguous 1-D uint8 (UTF-8) or int32 (code points) tensor");
  TORCH_CHECK(split.dim() == 1 && split.is_contiguous() && split.scalar_type() == at::kInt,
              "layout_ids: split must be a contiguous 1-D int32 tensor of code points");
  const int64_t B = offsets.numel() - 1, V = table.numel();
  TORCH_CHECK(B >= 0 && offsets.data_ptr<int64_t>()[0] == 0 && offsets.data_ptr<int64_t>()[B] == ids.numel(),
              "layout_ids: offsets must run from 0 to ids.numel()");
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) TORCH_CHECK(o[r] <= o[r + 1], "layout_ids: offsets must not decrease");
  TORCH_CHECK(row_frame.numel() == B, "layout_ids: row_frame must have one entry per row");
  TORCH_CHECK(frame_offsets.numel() % 2 == 1, "layout_ids: frame_offsets must have 2 F + 1 entries");
  TORCH_CHECK(separator_readout >= 0 && separator_readout <= separator.numel(),
              "layout_ids: separator_readout must be in [0, separator.numel()]");
  Args A{ids.data_ptr<int64_t>(),   o,
         table.data_ptr<int64_t>(), frame.data_ptr<int64_t>(),
         frame_offsets.data_ptr<int64_t>(), row_frame.data_ptr<int64_t>(),
         separator.data_ptr<int64_t>(), split.data_ptr<int32_t>(),
         B, V, (frame_offsets.numel() - 1) / 2, split.numel(), separator.numel(), separator_readout, max_length,
         pieces.numel(), read_last};
  if (pieces.scalar_type() == at::kByte) return layout<uint8_t>(A, pieces.data_ptr<uint8_t>(), at::kByte);
  return layout<int32_t>(A, pieces.data_ptr<int32_t>(), at::kInt);
}

}  // namespace

TORCH_LIBRARY(p2t_host, m) {
  m.def("layout_ids(Tensor ids, Tensor offsets, Tensor pieces, Tensor table, Tensor split, Tensor frame, "
        "Tensor frame_offsets, Tensor row_frame, Tensor separator, int separator_readout, int max_length, "
        "bool read_last) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(p2t_host, CPU, m) { m.impl("layout_ids", &layout_ids_cpu); }

}  // namespace p2t
