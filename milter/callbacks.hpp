// libmilter callbacks: collect the transaction facts, classify at end of message, and tell
// the MTA what to do. Nothing here throws into libmilter.
#pragma once

#include <libmilter/mfapi.h>

namespace paasmilter {

// The filter description to hand to smfi_register().
smfiDesc milter_description();

// Messages between MAIL FROM and end of message (or abort) on all connections.
int messages_in_flight();

}  // namespace paasmilter
