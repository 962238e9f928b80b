// Path-compressed binary trie over address bits for cidr tables. One root per address family.
//
// Postfix cidr tables are FIRST MATCH IN FILE ORDER, not longest match. So each prefix is
// stored with the index of its entry, and a lookup walks the nodes on the address's path,
// looking at every stored prefix on the way and keeping the smallest entry index.
//
// A node exists only where a prefix is stored or where the path branches (a PATRICIA
// trie): 100,000 random /32 and /128 entries make ~17 levels, not 32 or 128, and a
// lookup walks at most one node per level. Each node keeps its whole prefix, so stepping to
// a child is one masked comparison of the skipped bits. Lookup cost is O(address bits) at
// worst, O(log entries) for typical tables, whatever the table size.
//
// Where the trie is dense (the top of a big table: 35,000 hosts in 10/8 fill every path
// down to /23), the binary levels are what a lookup pays for, one cache miss each. So
// finish() gives such nodes a jump table (level compression): indexed by the next k address
// bits, it names the deepest node within those k bits (with a copy of its edges) and the
// lowest value stored on the way, so lowest_match() crosses up to 16 levels with one load
// and goes on to the next node without loading that one: with tests/bench's 100,000
// entries a lookup reads about 4 nodes instead of 17. Jump tables are an index only:
// for_each_match() walks the nodes, and a trie without them (finish() not called, or an
// insert since) answers the same.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "paasmilter/ip.hpp"

namespace paasmilter {

class PrefixTrie {
  public:
    static constexpr std::uint32_t npos = std::numeric_limits<std::uint32_t>::max();

    PrefixTrie() : nodes_(2) {}  // nodes_[0]: IPv4 root, nodes_[1]: IPv6 root (both /0)

    // Stores `value` (an entry index) under `network`. Values may repeat a prefix.
    void insert(const IpNetwork& network, std::uint32_t value) {
        drop_jumps();
        const Bits key = Bits::of(network.address);
        const int length = network.prefix_length;
        std::uint32_t node = root(network.address.family);
        for (;;) {
            const int depth = nodes_[node].depth;
            if (depth == length) break;
            const int bit = key.bit(depth);
            const std::uint32_t child = nodes_[node].child[bit];
            if (child == npos) {
                const std::uint32_t leaf = add_node(key, length);
                nodes_[node].child[bit] = leaf;
                node = leaf;
                break;
            }
            const Bits next_prefix = nodes_[child].prefix;
            const int next_depth = nodes_[child].depth;
            const int common = std::min({key.common_prefix(next_prefix), length, next_depth});
            if (common == next_depth) {  // the child's prefix is a prefix of the network
                node = child;
                continue;
            }
            // Split the edge at `common`: a new node there, the child below it.
            const std::uint32_t middle = add_node(key, common);
            nodes_[middle].child[next_prefix.bit(common)] = child;
            nodes_[node].child[bit] = middle;
            node = middle;
            if (common == length) break;
            const std::uint32_t leaf = add_node(key, length);
            nodes_[middle].child[key.bit(common)] = leaf;
            node = leaf;
            break;
        }
        Node& target = nodes_[node];
        if (value < target.lowest) target.lowest = value;
        values_.push_back(ValueLink{value, target.values});
        target.values = static_cast<std::uint32_t>(values_.size() - 1);
    }

    // Builds the jump tables, once every prefix is in.
    void finish() {
        drop_jumps();
        const std::vector<std::uint32_t> sizes = subtree_sizes();
        std::vector<bool> done(nodes_.size());
        std::vector<Candidate> pending{{root(IpFamily::v4), 32}, {root(IpFamily::v6), 128}};
        while (!pending.empty()) {
            const Candidate candidate = pending.back();
            pending.pop_back();
            if (done[candidate.node]) continue;
            done[candidate.node] = true;
            add_jump(candidate, sizes, pending);
        }
        for (Jump& jump : jumps_) {
            const Node& target = nodes_[jump.node];
            jump.child = target.child;
            jump.depth = target.depth;
            jump.target_jumps = target.jump_bits != 0;
        }
    }

    // The smallest value stored under any prefix of `address`, or npos.
    std::uint32_t lowest_match(const IpAddress& address) const {
        const Bits key = Bits::of(address);
        const int bits = address.bit_count();
        const Node* node = &nodes_[root(address.family)];
        std::uint32_t best = node->lowest;
        for (;;) {
            if (node->jump_bits != 0) {
                const Jump& jump = jumps_[node->jump + key.range(node->depth, node->jump_bits)];
                best = std::min(best, jump.lowest);
                if (jump.target_jumps && jump.node != index_of(node)) {
                    node = &nodes_[jump.node];
                    continue;
                }
                if (jump.depth >= bits) return best;
                const std::uint32_t child = jump.child[key.bit(jump.depth)];
                if (child == npos) return best;
                node = &nodes_[child];
                if (!key.same_prefix(node->prefix, node->depth)) return best;
                best = std::min(best, node->lowest);
                continue;
            }
            if (node->depth >= bits) return best;
            const std::uint32_t child = node->child[key.bit(node->depth)];
            if (child == npos) return best;
            node = &nodes_[child];
            if (!key.same_prefix(node->prefix, node->depth)) return best;
            best = std::min(best, node->lowest);
        }
    }

    // Calls visit(value) for every value stored under a prefix of `address`, in no
    // particular order.
    template <class Visitor>
    void for_each_match(const IpAddress& address, Visitor&& visit) const {
        walk(address, [&](const Node& node) {
            for (std::uint32_t link = node.values; link != npos; link = values_[link].next) {
                visit(values_[link].value);
            }
        });
    }

    std::size_t node_count() const { return nodes_.size(); }
    std::size_t jump_entry_count() const { return jumps_.size(); }

  private:
    // The 128 address bits as two words, most significant first; IPv4 in the top 32.
    struct Bits {
        std::uint64_t high = 0;
        std::uint64_t low = 0;

        static Bits of(const IpAddress& address) {
            Bits bits;
            for (int i = 0; i < 8; ++i) bits.high = bits.high << 8 | address.bytes[i];
            for (int i = 8; i < 16; ++i) bits.low = bits.low << 8 | address.bytes[i];
            return bits;
        }
        int bit(int index) const {
            return index < 64 ? static_cast<int>(high >> (63 - index) & 1)
                              : static_cast<int>(low >> (127 - index) & 1);
        }
        // How many leading bits the two have in common (128 when equal).
        int common_prefix(const Bits& other) const {
            if (const std::uint64_t x = high ^ other.high) return __builtin_clzll(x);
            if (const std::uint64_t x = low ^ other.low) return 64 + __builtin_clzll(x);
            return 128;
        }
        // Equal in the first `length` bits.
        bool same_prefix(const Bits& other, int length) const {
            if (length <= 64) return length == 0 || ((high ^ other.high) >> (64 - length)) == 0;
            return high == other.high && ((low ^ other.low) >> (128 - length)) == 0;
        }
        // `count` (1..16) bits from bit `first` on, as a number.
        std::uint32_t range(int first, int count) const {
            std::uint64_t window;
            if (first >= 64) {
                window = low << (first - 64);
            } else if (first == 0) {
                window = high;
            } else {
                window = high << first | low >> (64 - first);
            }
            return static_cast<std::uint32_t>(window >> (64 - count));
        }
        // Bit `index` set to `value`.
        void set_bit(int index, int value) {
            std::uint64_t& word = index < 64 ? high : low;
            const std::uint64_t mask = std::uint64_t{1} << (63 - index % 64);
            word = value ? word | mask : word & ~mask;
        }
        // Bits past `length` cleared.
        Bits truncated(int length) const {
            Bits out;
            if (length >= 64) {
                out.high = high;
                out.low = length >= 128 ? low : length == 64 ? 0 : low & ~(~0ull >> (length - 64));
            } else {
                out.high = length == 0 ? 0 : high & ~(~0ull >> length);
            }
            return out;
        }
    };

    struct Node {
        Bits prefix;  // the node's prefix, bits past depth zero
        std::array<std::uint32_t, 2> child{npos, npos};
        std::uint32_t lowest = npos;  // smallest value stored exactly here
        std::uint32_t values = npos;  // head of this node's list in values_
        std::uint32_t jump = 0;       // first entry of its jump table in jumps_
        std::uint8_t depth = 0;       // prefix length
        std::uint8_t jump_bits = 0;   // 0: no jump table
    };
    // Where the next bits lead: the deepest node within them (the table's own node when
    // there is none), and the lowest value stored below the table's node down to it.
    // With a copy of the target's edges, so that a lookup steps on without loading it
    // (one cache miss less), unless the target has a jump table of its own.
    struct Jump {
        std::uint32_t node;
        std::uint32_t lowest;
        std::array<std::uint32_t, 2> child{npos, npos};
        std::uint8_t depth = 0;
        bool target_jumps = false;
    };
    struct ValueLink {
        std::uint32_t value;
        std::uint32_t next;
    };

    static std::uint32_t root(IpFamily family) { return family == IpFamily::v4 ? 0 : 1; }
    static constexpr int kMaxJumpBits = 16;
    static constexpr std::size_t kMinJumpSubtree = 64;  // nodes below, for a table to pay

    std::uint32_t add_node(const Bits& key, int length) {
        Node node;
        node.prefix = key.truncated(length);
        node.depth = static_cast<std::uint8_t>(length);
        nodes_.push_back(node);  // invalidates references: index only
        return static_cast<std::uint32_t>(nodes_.size() - 1);
    }

    std::uint32_t index_of(const Node* node) const {
        return static_cast<std::uint32_t>(node - nodes_.data());
    }

    void drop_jumps() {
        if (jumps_.empty()) return;
        jumps_.clear();
        for (Node& node : nodes_) node.jump_bits = 0;
    }

    // Nodes in each node's subtree, itself included.
    std::vector<std::uint32_t> subtree_sizes() const {
        std::vector<std::uint32_t> sizes(nodes_.size(), 1);
        std::vector<std::uint32_t> order;  // parents before children
        order.reserve(nodes_.size());
        for (const std::uint32_t r : {root(IpFamily::v4), root(IpFamily::v6)}) {
            order.push_back(r);
        }
        for (std::size_t i = 0; i < order.size(); ++i) {
            for (const std::uint32_t child : nodes_[order[i]].child) {
                if (child != npos) order.push_back(child);
            }
        }
        for (std::size_t i = order.size(); i-- > 0;) {
            for (const std::uint32_t child : nodes_[order[i]].child) {
                if (child != npos) sizes[order[i]] += sizes[child];
            }
        }
        return sizes;
    }

    // Where `target`'s bits lead from `from` down to depth `limit`: the deepest node on
    // the way and the lowest value stored below `from` down to it.
    Jump follow(std::uint32_t from, const Bits& target, int limit) const {
        Jump jump{from, npos, {npos, npos}, 0, false};
        for (;;) {
            const Node& node = nodes_[jump.node];
            if (node.depth >= limit) return jump;
            const std::uint32_t child = node.child[target.bit(node.depth)];
            if (child == npos) return jump;
            const Node& next = nodes_[child];
            // A child past the limit is the walk's business (it checks the skipped bits).
            if (next.depth > limit || !target.same_prefix(next.prefix, next.depth)) return jump;
            jump.lowest = std::min(jump.lowest, next.lowest);
            jump.node = child;
        }
    }

    struct Candidate {
        std::uint32_t node;
        int address_bits;  // 32 or 128
    };

    // A jump table for the candidate if its subtree is big and dense enough (a quarter of
    // the table's entries lead somewhere); then the same test for the nodes a lookup goes
    // on from.
    void add_jump(const Candidate& candidate, const std::vector<std::uint32_t>& sizes,
                  std::vector<Candidate>& pending) {
        const std::uint32_t node = candidate.node;
        if (sizes[node] < kMinJumpSubtree) return;
        const int depth = nodes_[node].depth;
        int bits = std::min(kMaxJumpBits, candidate.address_bits - depth);
        while (bits > 1 && (std::size_t{1} << (bits + 1)) > sizes[node]) --bits;
        if (bits >= 4) {
            const std::size_t count = std::size_t{1} << bits;
            std::vector<Jump> table(count);
            std::size_t useful = 0;
            Bits target = nodes_[node].prefix;
            for (std::size_t x = 0; x < count; ++x) {
                for (int b = 0; b < bits; ++b) {
                    target.set_bit(depth + b, static_cast<int>(x >> (bits - 1 - b) & 1));
                }
                table[x] = follow(node, target, depth + bits);
                if (table[x].node != node) ++useful;
            }
            if (useful * 4 >= count) {
                nodes_[node].jump = static_cast<std::uint32_t>(jumps_.size());
                nodes_[node].jump_bits = static_cast<std::uint8_t>(bits);
                jumps_.insert(jumps_.end(), table.begin(), table.end());
                std::uint32_t previous = npos;
                for (const Jump& jump : table) {  // targets come in runs
                    if (jump.node != node && jump.node != previous) {
                        pending.push_back({jump.node, candidate.address_bits});
                    }
                    previous = jump.node;
                }
                // Paths with no node within the table go on from the node's children.
                for (const std::uint32_t child : nodes_[node].child) {
                    if (child != npos && nodes_[child].depth > depth + bits) {
                        pending.push_back({child, candidate.address_bits});
                    }
                }
                return;
            }
        }
        for (const std::uint32_t child : nodes_[node].child) {
            if (child != npos) pending.push_back({child, candidate.address_bits});
        }
    }

    // Calls on_node for each node whose prefix covers `address`, the root (/0) included,
    // shortest first.
    template <class OnNode>
    void walk(const IpAddress& address, OnNode&& on_node) const {
        const Bits key = Bits::of(address);
        const int bits = address.bit_count();
        const Node* node = &nodes_[root(address.family)];
        for (;;) {
            on_node(*node);
            if (node->depth >= bits) return;
            const std::uint32_t child = node->child[key.bit(node->depth)];
            if (child == npos) return;
            node = &nodes_[child];
            if (!key.same_prefix(node->prefix, node->depth)) return;
        }
    }

    std::vector<Node> nodes_;
    std::vector<ValueLink> values_;
    std::vector<Jump> jumps_;
};

}  // namespace paasmilter
