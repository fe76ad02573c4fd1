// The tile ranges of csrc/attention_rule.h against a direct walk of the backward's grid: the deterministic dQ
// order (bwd_tile_io.cuh, DqOrder) ranks the key tiles that visit a query tile by first_key_tile /
// last_key_tile, and a rank no visitor takes would leave its successors waiting forever.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "attention_rule.h"

namespace {

using flash_attn2::Visibility;

// The query tiles key tile n visits, as BwdSteps (bwd_tile_io.cuh) walks them.
void visited_query_tiles(const Visibility<int>& vis, int n, int block_m, int block_n, int& m_begin, int& m_end) {
  const int k0 = n * block_n, keys = std::min(block_n, vis.seqlen_k - k0);
  const int q_begin = vis.query_begin(k0), q_end = vis.query_end(k0 + keys - 1);
  m_begin = q_begin / block_m;
  m_end = q_end > q_begin ? (q_end + block_m - 1) / block_m : m_begin;
}

TEST(AttentionRule, KeyTileRangesMatchTheBackwardWalk) {
  const int sizes[] = {1, 7, 63, 64, 65, 127, 128, 129, 200, 333, 517};
  const int windows[] = {-1, 0, 1, 7, 37, 64, 129, 300};
  const int tiles[][2] = {{64, 128}, {128, 128}, {64, 64}, {128, 64}};
  int checked = 0, with_visitors = 0;
  for (int nq : sizes)
    for (int nk : sizes)
      for (int left : windows)
        for (int right : windows)
          for (const auto& bm_bn : tiles) {
            const int block_m = bm_bn[0], block_n = bm_bn[1];
            const Visibility<int> vis{nq, nk, left, right};
            const int num_m = (nq + block_m - 1) / block_m, num_n = (nk + block_n - 1) / block_n;
            std::vector<std::vector<int>> visitors(num_m);
            for (int n = 0; n < num_n; ++n) {
              int m_begin = 0, m_end = 0;
              visited_query_tiles(vis, n, block_m, block_n, m_begin, m_end);
              ASSERT_LE(m_end, num_m);
              for (int m = m_begin; m < m_end; ++m) visitors[m].push_back(n);
            }
            for (int m = 0; m < num_m; ++m) {
              const int first = vis.first_key_tile(m * block_m, block_n);
              const int last = vis.last_key_tile(m * block_m, block_m, block_n);
              SCOPED_TRACE(::testing::Message() << "nq " << nq << " nk " << nk << " left " << left << " right "
                                                << right << " tiles " << block_m << "x" << block_n << " m " << m);
              ++checked;
              if (visitors[m].empty()) continue;  // DqOrder is never asked about a tile nobody visits
              ++with_visitors;
              // Visitors are walked in key-tile order and form one range [first, last].
              EXPECT_EQ(visitors[m].front(), first);
              EXPECT_EQ(visitors[m].back(), last);
              EXPECT_EQ(static_cast<int>(visitors[m].size()), last - first + 1);
            }
          }
  EXPECT_GT(with_visitors, checked / 2);
}

}  // namespace
