// Binary trie over address bits for cidr tables. One root per address family.
//
// Postfix cidr tables are FIRST MATCH IN FILE ORDER, not longest match. So each prefix is
// stored with the index of its entry, and a lookup walks the address's bits (at most 33
// or 129 nodes), looking at every stored prefix on the way and keeping the smallest entry
// index. Lookup cost is O(address bits) whatever the table size.
#pragma once

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "paasmilter/ip.hpp"

namespace paasmilter {

class PrefixTrie {
  public:
    static constexpr std::uint32_t npos = std::numeric_limits<std::uint32_t>::max();

    PrefixTrie() : nodes_(2) {}  // nodes_[0]: IPv4 root, nodes_[1]: IPv6 root

    // Stores `value` (an entry index) under `network`. Values may repeat a prefix.
    void insert(const IpNetwork& network, std::uint32_t value) {
        std::uint32_t node = root(network.address.family);
        for (int i = 0; i < network.prefix_length; ++i) {
            const int bit = network.address.bit(i);
            if (nodes_[node].child[bit] == npos) {
                nodes_[node].child[bit] = static_cast<std::uint32_t>(nodes_.size());
                nodes_.emplace_back();  // invalidates references: index only
            }
            node = nodes_[node].child[bit];
        }
        Node& target = nodes_[node];
        if (value < target.lowest) target.lowest = value;
        values_.push_back(ValueLink{value, target.values});
        target.values = static_cast<std::uint32_t>(values_.size() - 1);
    }

    // The smallest value stored under any prefix of `address`, or npos.
    std::uint32_t lowest_match(const IpAddress& address) const {
        std::uint32_t best = npos;
        walk(address, [&](const Node& node) {
            if (node.lowest < best) best = node.lowest;
        });
        return best;
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

  private:
    struct Node {
        std::array<std::uint32_t, 2> child{npos, npos};
        std::uint32_t lowest = npos;  // smallest value stored exactly here
        std::uint32_t values = npos;  // head of this node's list in values_
    };
    struct ValueLink {
        std::uint32_t value;
        std::uint32_t next;
    };

    static std::uint32_t root(IpFamily family) { return family == IpFamily::v4 ? 0 : 1; }

    // Calls on_node for each node on the path of `address`, the root (/0) included.
    template <class OnNode>
    void walk(const IpAddress& address, OnNode&& on_node) const {
        std::uint32_t node = root(address.family);
        on_node(nodes_[node]);
        const int bits = address.bit_count();
        for (int i = 0; i < bits; ++i) {
            node = nodes_[node].child[address.bit(i)];
            if (node == npos) return;
            on_node(nodes_[node]);
        }
    }

    std::vector<Node> nodes_;
    std::vector<ValueLink> values_;
};

}  // namespace paasmilter
