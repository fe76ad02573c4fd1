// The tile ranges of csrc/attention_rule.h against a direct walk of the backward's grid: the deterministic dQ
// order (bwd_tile_io.cuh, DqOrder) ranks the key tiles that visit a query tile by first_key_tile /
// last_key_tile, and a rank no visitor takes would leave its successors waiting forever.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <vector>

#include "attention_rule.h"

namespace {

using flash_attn2::GridOrder;
using flash_attn2::RotatedDqWalk;
using flash_attn2::Visibility;

// The query tiles key tile n visits, as BwdSteps (bwd_tile_io.cuh) walks them.
void visited_query_tiles(const Visibility<int>& vis, int n, int block_m, int block_n, int& m_begin, int& m_end) {
  const int k0 = n * block_n, keys = std::min(block_n, vis.seqlen_k - k0);
  const int q_begin = vis.query_begin(k0), q_end = vis.query_end(k0 + keys - 1);
  m_begin = q_begin / block_m;
  m_end = q_end > q_begin ? (q_end + block_m - 1) / block_m : m_begin;
}

// The grid orders (GridOrder, FwdBlockInfo / BwdBlockInfo): every block index maps to a distinct (tile rank,
// head), every pair is reached, GridOrder::index inverts the map; head by head for groups 0 and 1; in groups, heads [g G, g G + G) fill blocks
// [g G T, (g + 1) G T) and a group's ranks never decrease with the block index (its long tiles first).
TEST(AttentionRule, GridOrderIsOneToOneAndGroupsRanks) {
  const int64_t tiles_list[] = {1, 2, 5, 16, 64}, heads_list[] = {1, 3, 7, 8, 32, 33, 256},
                groups[] = {0, 1, 2, 3, 8, 16, 40, 1000};
  int checked = 0;
  for (int64_t tiles : tiles_list)
    for (int64_t heads : heads_list)
      for (int64_t group : groups) {
        std::vector<int> seen(tiles * heads, 0);
        int64_t last_rank = -1, last_group = -1;
        for (int64_t bid = 0; bid < tiles * heads; ++bid) {
          const GridOrder<int64_t> o(bid, tiles, heads, group);
          ASSERT_GE(o.rank, 0);
          ASSERT_LT(o.rank, tiles);
          ASSERT_GE(o.head, 0);
          ASSERT_LT(o.head, heads);
          ASSERT_EQ(GridOrder<int64_t>::index(o.rank, o.head, tiles, heads, group), bid) << "the inverse";
          ++seen[o.head * tiles + o.rank];
          if (group <= 1) {
            EXPECT_EQ(o.head, bid / tiles);
            EXPECT_EQ(o.rank, bid % tiles);
          } else {
            const int64_t g = o.head / group;
            EXPECT_EQ(g, bid / (group * tiles)) << "a group's blocks are contiguous";
            if (g == last_group) EXPECT_GE(o.rank, last_rank) << "bid " << bid;
            last_group = g;
            last_rank = o.rank;
          }
        }
        for (int c : seen) ASSERT_EQ(c, 1) << "tiles " << tiles << " heads " << heads << " group " << group;
        ++checked;
      }
  EXPECT_EQ(checked, 5 * 7 * 8);
}

TEST(AttentionRule, KeyTileRangesMatchTheBackwardWalk) {
  const int sizes[] = {1, 7, 63, 64, 65, 127, 128, 129, 200, 333, 517};
  const int windows[] = {-1, 0, 1, 7, 37, 64, 129, 300};
  const int tiles[][2] = {{64, 128}, {128, 128}, {64, 64}, {128, 64}, {80, 128}};  // 80 x 128: the d128 WS backward's steps
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

// The rotated deterministic walk (RotatedDqWalk): each key tile's walk visits every query tile once, each query
// tile's turns are a permutation of its visitors, and a turn never goes to a key tile before one that arrives
// earlier (ties, where key tiles share a start: the later key tile first, as without the rotation).
TEST(AttentionRule, RotatedDqWalkTurnsFollowArrivals) {
  for (int k = 1; k <= 40; ++k)
    for (int m_count = 1; m_count <= 40; ++m_count) {
      const RotatedDqWalk<int> walk{k, m_count};
      SCOPED_TRACE(::testing::Message() << "K " << k << " M " << m_count);
      for (int n = 0; n < k; ++n) {
        std::vector<int> seen(m_count, 0);
        for (int s = 0; s < m_count; ++s) {
          const int m = walk.tile_at(n, s);
          ASSERT_GE(m, 0);
          ASSERT_LT(m, m_count);
          ++seen[m];
          ASSERT_EQ(walk.arrival(n, m), s);
        }
        ASSERT_EQ(*std::min_element(seen.begin(), seen.end()), 1);
      }
      for (int m = 0; m < m_count; ++m) {
        std::vector<int> by_rank(k, -1);
        for (int n = 0; n < k; ++n) {
          const int r = walk.rank(n, m);
          ASSERT_GE(r, 0);
          ASSERT_LT(r, k);
          ASSERT_EQ(by_rank[r], -1) << "two key tiles with turn " << r << " at query tile " << m;
          by_rank[r] = n;
        }
        for (int r = 1; r < k; ++r) {
          const int a = by_rank[r - 1], b = by_rank[r];
          ASSERT_LE(walk.arrival(a, m), walk.arrival(b, m)) << "turn " << r << " at query tile " << m;
          if (walk.arrival(a, m) == walk.arrival(b, m)) {
            ASSERT_GT(a, b);
          }
        }
      }
    }
}

// Finish time of a head's backward under a simple model: every key-tile block starts at once, computes a step in
// 1, and its dQ adds (h each, one at a time per block, each after its turn's predecessor's) trail its steps.
// Returns the last add's end. rotate = false: the walk from query tile 0 and turns from the last key tile down.
double head_finish_time(int k, int m_count, double h, bool rotate) {
  const RotatedDqWalk<int> walk{k, m_count};
  auto tile = [&](int n, int s) { return rotate ? walk.tile_at(n, s) : s; };
  auto step_of = [&](int n, int m) { return rotate ? walk.arrival(n, m) : m; };
  auto rank = [&](int n, int m) { return rotate ? walk.rank(n, m) : k - 1 - n; };
  std::vector<int> by_rank(static_cast<size_t>(k) * m_count);
  for (int m = 0; m < m_count; ++m)
    for (int n = 0; n < k; ++n) by_rank[static_cast<size_t>(m) * k + rank(n, m)] = n;
  std::vector<double> end(static_cast<size_t>(k) * m_count, -1.0);  // add end of (n, s)
  std::function<double(int, int)> add_end = [&](int n, int s) -> double {
    double& e = end[static_cast<size_t>(n) * m_count + s];
    if (e >= 0) return e;
    const int m = tile(n, s), r = rank(n, m);
    double start = s + 1.0;                                  // its step's products are done
    if (s > 0) start = std::max(start, add_end(n, s - 1));  // its previous adds are done
    if (r > 0) {
      const int pred = by_rank[static_cast<size_t>(m) * k + r - 1];
      start = std::max(start, add_end(pred, step_of(pred, m)));  // the turn before it is done
    }
    return e = start + h;
  };
  double finish = 0;
  for (int n = 0; n < k; ++n) finish = std::max(finish, add_end(n, m_count - 1));
  return finish;
}

TEST(AttentionRule, RotatedDqWalkRemovesTheHandOffChain) {
  const double h = 0.5;  // a hand-off at half a step
  for (int k = 2; k <= 24; ++k)
    for (int m_count = 2; m_count <= 24; ++m_count) {
      SCOPED_TRACE(::testing::Message() << "K " << k << " M " << m_count);
      const double plain = head_finish_time(k, m_count, h, false), rotated = head_finish_time(k, m_count, h, true);
      EXPECT_DOUBLE_EQ(plain, m_count + k * h);  // the chain: each key tile a hand-off behind the next
      if (m_count >= k) {
        EXPECT_DOUBLE_EQ(rotated, m_count + h);  // nobody waits
      }
      EXPECT_LE(rotated, plain);
    }
}

// Dispatch in blockIdx order (a head's key tiles together, the last first, as BwdBlockInfo lays them out) onto
// `slots` resident blocks, each block's dQ writer taking its turn at each query tile: true when every block
// finishes. Several heads, so the frontier head shares the GPU with whole ones. How a writer hands a turn on:
enum class Handoff {
  kAtOnce,       // after its adds (DqOrder's acquire / release)
  kBeforeNext,   // when it reaches its next step, before waiting for that turn (DqOrderChain; the WS writer rotated)
  kAfterNext,    // once it holds its next turn and issued those adds (the WS writer's bulk_wait<1>, unrotated)
};
bool schedule_completes(int heads, int k, int m_count, int slots, bool rotate, Handoff handoff = Handoff::kAtOnce) {
  const RotatedDqWalk<int> walk{k, m_count};
  const int blocks = heads * k;
  std::vector<int> step(blocks, 0), held(blocks, -1), counter(static_cast<size_t>(heads) * m_count, 0);
  std::vector<char> resident(blocks, 0);
  int next = 0, running = 0, done = 0;
  auto pass = [&](int b) {
    if (held[b] >= 0) ++counter[static_cast<size_t>(b / k) * m_count + held[b]], held[b] = -1;
  };
  while (done < blocks) {
    while (running < slots && next < blocks) resident[next++] = 1, ++running;
    bool progress = false;
    for (int b = 0; b < next; ++b) {
      if (!resident[b]) continue;
      const int head = b / k, n = k - 1 - b % k;
      if (step[b] == m_count) {  // the last turn passes on at the end
        pass(b), resident[b] = 0, --running, ++done, progress = true;
        continue;
      }
      if (handoff == Handoff::kBeforeNext && held[b] >= 0) pass(b), progress = true;
      const int m = rotate ? walk.tile_at(n, step[b]) : step[b];
      const int r = rotate ? walk.rank(n, m) : k - 1 - n;
      if (counter[static_cast<size_t>(head) * m_count + m] != r) continue;
      if (handoff == Handoff::kAfterNext) pass(b);
      held[b] = m, ++step[b], progress = true;
      if (handoff == Handoff::kAtOnce) pass(b);
    }
    if (!progress && !(running < slots && next < blocks)) return false;
  }
  return true;
}

TEST(AttentionRule, RotatedDqWalkNeedsAHeadResident) {
  for (Handoff handoff : {Handoff::kAtOnce, Handoff::kBeforeNext})
    for (int k : {2, 3, 8, 16, 33})
      for (int m_count : {2, 5, 8, 16, 33, 40})
        for (int slots : {1, 2, 7, 16, 33, 66, 132}) {
          SCOPED_TRACE(::testing::Message() << "K " << k << " M " << m_count << " slots " << slots << " handoff "
                                            << static_cast<int>(handoff));
          EXPECT_TRUE(schedule_completes(5, k, m_count, slots, false, handoff));  // waits on lower indices only
          if (slots >= k) {
            EXPECT_TRUE(schedule_completes(5, k, m_count, slots, true, handoff));
          }
          // dq_walk_rotates asks for 4 K <= SMs: a head's blocks fit with room to spare.
          if (flash_attn2::dq_walk_rotates(true, k, m_count, slots)) {
            EXPECT_TRUE(schedule_completes(5, k, m_count, slots, true, handoff));
          }
        }
  // Why the launcher asks: with fewer slots than key tiles the rotated walk can wait on a block never dispatched.
  EXPECT_FALSE(schedule_completes(5, 8, 8, 4, true));
}

// The WS writer's hand-off a step late (it takes its next turn, then passes the last one on) is safe unrotated,
// where every wait runs to a later key tile. Rotated, wherever M <= K, a key tile's predecessor at its next query
// tile arrived there a step before it (one start later, or the same start) and holds it until it takes its own
// next turn: a cycle around the head. So the rotated WS writer hands each turn on before it waits for its next
// (kBeforeNext), and that completes wherever the heads fit.
TEST(AttentionRule, RotatedDqWalkHandsOffBeforeItsNextTurn) {
  for (int k = 2; k <= 24; ++k)
    for (int m_count = 2; m_count <= 24; ++m_count) {
      SCOPED_TRACE(::testing::Message() << "K " << k << " M " << m_count);
      EXPECT_TRUE(schedule_completes(3, k, m_count, 1, false, Handoff::kAfterNext));  // one block at a time
      EXPECT_TRUE(schedule_completes(3, k, m_count, 2 * k, false, Handoff::kAfterNext));
      EXPECT_TRUE(schedule_completes(3, k, m_count, k, true, Handoff::kBeforeNext));
      EXPECT_TRUE(schedule_completes(3, k, m_count, 4 * k, true, Handoff::kBeforeNext));
      if (m_count <= k) {
        EXPECT_FALSE(schedule_completes(3, k, m_count, 4 * k, true, Handoff::kAfterNext));
      } else {
        EXPECT_TRUE(schedule_completes(3, k, m_count, 4 * k, true, Handoff::kAfterNext));
      }
    }
}

}  // namespace
